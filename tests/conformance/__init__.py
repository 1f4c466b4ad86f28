"""ONNX's own backend tests as a conformance suite for kiln: every node test and light model through
`kiln optimize`, then the engine on the test's own inputs against its expected outputs.

`python -m tests.conformance.run --help` runs it; test_conformance.py runs a seeded sample in CI.
"""
