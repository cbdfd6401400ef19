"""The export: model -> traced graphs -> training artifacts, validated against PyTorch."""
