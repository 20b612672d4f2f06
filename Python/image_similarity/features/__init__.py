"""The pretrained networks (backbones) and the numeric precision they run at."""
