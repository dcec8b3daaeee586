"""`vmzconv verify`: accuracy on Kinetics-400 val (or any list) the way MMAction2 tests."""
