"""Process control: /proc reading, pidfd handles, duty cycles and the foreground job."""
