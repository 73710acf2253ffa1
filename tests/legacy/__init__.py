"""Tests of the legacy devices (serial, i8042, debug exit) and the console front end."""
