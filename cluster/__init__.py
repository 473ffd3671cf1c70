"""Ray: the Serve application, shard actors, the policy actor, the job store and the client SDK.

Only this subpackage imports Ray, FastAPI or DeepSpeed's distributed parts.
"""
