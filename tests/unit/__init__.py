"""Unit tests: one part at a time, in-process, no kernel (codec, index and migrations,
local packs, the store's lock and accounting, the object-store contract, stalls, the
snapshot lifecycle). In the fast suite, `pytest -m 'not mount'`."""
