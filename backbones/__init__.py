"""Per-family knowledge of timm backbones (stems, stages, heads): one module per family."""
