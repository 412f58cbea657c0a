"""Label Studio ML backend: translates Label Studio JSON to and from lazyxmem_core types."""
