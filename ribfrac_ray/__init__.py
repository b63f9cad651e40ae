"""Two-stage rib fracture detection and segmentation on Ray."""
