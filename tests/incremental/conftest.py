from tests.storage.conftest import clean_proxies, gs_store, s3_store  # noqa: F401 (fixtures)
