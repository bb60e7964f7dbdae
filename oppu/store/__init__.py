"""Object storage of personal adapters and per-user API tokens (fsspec: local paths, file://, s3://)."""

from oppu.store.adapters import AdapterKey, AdapterStore, Manifest, config_hash
from oppu.store.tokens import TokenStore

__all__ = ["AdapterKey", "AdapterStore", "Manifest", "TokenStore", "config_hash"]
