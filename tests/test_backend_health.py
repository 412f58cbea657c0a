import base64

from backend.app import create_app
from backend.settings import BackendSettings


def test_health_setup_and_basic_auth(monkeypatch):
    monkeypatch.setenv("BASIC_AUTH_USER", "ann")
    monkeypatch.setenv("BASIC_AUTH_PASS", "secret")
    client = create_app(BackendSettings.from_env()).test_client()
    r = client.get("/health")
    assert r.status_code == 200 and r.json["status"] == "UP" and r.json["engine"] == "embedded"
    assert client.post("/setup", json={"project": "1.0", "schema": "<View/>"}).status_code == 401
    good = {"Authorization": "Basic " + base64.b64encode(b"ann:secret").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"ann:nope").decode()}
    assert client.post("/setup", json={"project": "1.0"}, headers=bad).status_code == 401
    r = client.post("/setup", json={"project": "1.0", "schema": "<View/>"}, headers=good)
    assert r.status_code == 400 and "neither a <Video> tag nor an <Image" in r.json["error"]
    config = open("backend/configs/video.xml").read()
    r = client.post("/setup", json={"project": "1.0", "schema": config}, headers=good)
    assert r.status_code == 200 and r.json["model_version"].startswith("lazyxmem-")
    r = client.post("/setup", data="{not json", headers={**good, "Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json["error"]
    assert client.get("/health").status_code == 200  # still serving
