"""RAFT optical flow (torchvision): forward and backward motion vectors per frame, in Nuke's convention."""
