"""freeze-webhook: the admission webhook that puts freeze-proxy between queue-proxy and the app."""
