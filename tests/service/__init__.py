"""Service tests: a Store and the FUSE Operations driven in-process, the handlers called
directly as the kernel would call them (as S3QL's t3_fs_api does), without mounting. In the
fast suite, `pytest -m 'not mount'`."""
