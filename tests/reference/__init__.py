"""Plain digital reference implementations the tests compare substrate's rules with."""
