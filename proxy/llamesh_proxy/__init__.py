"""The OpenAI gateway: routes client requests to llama-server instances on the status agents publish.

It imports `llamesh_api` only; it never calls the agent or the operator directly.
"""
