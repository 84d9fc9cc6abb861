"""The filesystem's behaviour: namespace, snapshot lifecycle, writers, copies,
recovery, retention, manifests, region administration, check."""
