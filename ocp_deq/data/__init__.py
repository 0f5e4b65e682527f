from ocp_deq.data.lmdb_io import read_lmdb, write_lmdb
from ocp_deq.data.toy_s2ef import ensure_toy_data, generate_toy_data

__all__ = ["read_lmdb", "write_lmdb", "ensure_toy_data", "generate_toy_data"]
