"""Cross-language tests: clients in other languages against a real numbersvc.

They need Node.js (20 or later) on PATH and `node_modules` installed from the committed lock
file (`make node_modules/.installed`; `make pytest` and `make test` do it). A missing `node`
fails these tests rather than skipping them: CI has it, and a skip would hide a broken mesh.
"""
