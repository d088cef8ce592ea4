"""miras: Titans and MIRAS."""
