"""The Gyges control plane: one channel from the HTTP server and the schedulers to the
host controller, which lives in SGLang's data-parallel controller process."""
