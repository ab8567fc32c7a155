"""freeze-proxy: the sidecar that freezes an idle Knative app and wakes it per request."""
