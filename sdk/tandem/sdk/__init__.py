"""The on-device SDK: local runtimes, routing policies and the cloud fallback."""
