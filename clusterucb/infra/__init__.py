"""What the workflow runs on: the results layout, atomic I/O, logging, devices, memory requests, config layers, plans."""
