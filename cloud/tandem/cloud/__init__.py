"""The cloud side: inference server, fleet service, console and model build pipeline."""
