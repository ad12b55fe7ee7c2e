"""The test rig: tiny GGUF models, a fault-injecting fake llama-server, and child-process helpers.

It exists so that tests can run the real llama-server in seconds and the fake one wherever a fault must be
provoked on purpose. It deliberately holds no test cases and no project code.
"""
