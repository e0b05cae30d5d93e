from tests.conftest import open_harness, ADMIN, invocation, read_lake


def test_pg_basic(tmp_path, postgres):
    uri = postgres.database()
    with open_harness(tmp_path / "data", state=uri) as h:
        em = h.emitter("gw-1")
        for _ in range(5):
            em.emit(**invocation())
        print(em.flush())
        h.flush()
        print(len(read_lake(tmp_path / "data")))
        print(h.client.get("/v1/log/checkpoint").text)
