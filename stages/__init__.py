"""One module per pipeline stage; each is thin over the library in fae_pipe."""
