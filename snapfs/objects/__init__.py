"""Object stores: where a region's block objects live (local packs, S3)."""
