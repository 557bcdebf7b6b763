"""Generated stubs for the numbersvc.v1 contract (`make proto`); do not edit."""
