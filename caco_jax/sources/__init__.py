"""Where archives come from: the change-aware location sampler (`sampling`), the Sentinel-2
downloader (`download`), and the embedded synthetic archive (`synthetic`)."""
