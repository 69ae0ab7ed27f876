"""Reinforcement learning from rewards (grpo.py: GRPO): its loss, its rewards (rewards.py), and
what multi-turn rollouts talk to: tools (tools.py, each call in a worker process:
tool_processes.py, tool_worker.py; sandbox.py for model-written code), environments
(environments.py, lookup_tools.py), the chat templates' tool calls (tool_format.py), and the
turns of a trajectory (agent.py)."""
