"""Object storage of personal adapters and per-user API tokens (fsspec: local paths, file://, s3://)."""

from oppu.store.adapters import AdapterStore
from oppu.store.manifest import AdapterKey, Manifest, config_hash
from oppu.store.tokens import TokenStore

__all__ = ["AdapterKey", "AdapterStore", "Manifest", "TokenStore", "config_hash"]
