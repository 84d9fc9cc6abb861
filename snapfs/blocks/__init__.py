"""The block repository's parts below the service: the decoded-block cache."""
