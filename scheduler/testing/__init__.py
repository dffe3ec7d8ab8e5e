"""What the tests, the benchmarks and `reminders run` without credentials use in place of the
real world: the fake WeChat."""
