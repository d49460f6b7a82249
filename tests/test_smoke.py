def test_smoke(patients):
    assert patients.ping() == "pong"
