"""The agent: prompt layout, policy (token sampling with the KV cache), closed-loop evaluation."""
