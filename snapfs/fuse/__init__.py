"""The kernel interface: FUSE operations (translation only), xattrs, mount records."""
