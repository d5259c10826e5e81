# Stand-in for Slicer's extension packaging (nothing to package in the test).
