"""freeze-daemon: the node agent that pauses and resumes a pod's containers for that pod only."""
