"""boto3, unchanged, signing with a key pair bedrock-gate issued (tests/it/access_keys.rs).

Usage: boto3_client.py ENDPOINT MODEL PROFILE_ARN

Reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment, as any boto3 program
does, and calls the five runtime operations and the two control-plane reads the proxy serves.
Prints one JSON object of what came back; exits non-zero on any exception.
"""

import json
import sys

import boto3
from botocore.config import Config

endpoint, model, profile_arn = sys.argv[1:4]
config = Config(retries={"max_attempts": 1}, region_name="us-east-1")
runtime = boto3.client("bedrock-runtime", endpoint_url=endpoint, config=config)
control = boto3.client("bedrock", endpoint_url=endpoint, config=config)

messages = [{"role": "user", "content": [{"text": "hi"}]}]
invoke_body = json.dumps(
    {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}],
    }
)
out = {}

r = runtime.converse(modelId=model, messages=messages)
out["converse"] = r["output"]["message"]["content"][0]["text"]
out["converse_input_tokens"] = r["usage"]["inputTokens"]

text = ""
events = 0
for event in runtime.converse_stream(modelId=model, messages=messages)["stream"]:
    events += 1
    text += event.get("contentBlockDelta", {}).get("delta", {}).get("text", "")
out["converse_stream"] = text
out["converse_stream_events"] = events

r = runtime.invoke_model(modelId=model, body=invoke_body, contentType="application/json")
out["invoke_model"] = json.loads(r["body"].read())["content"][0]["text"]

chunks = []
r = runtime.invoke_model_with_response_stream(
    modelId=profile_arn, body=invoke_body, contentType="application/json"
)
for event in r["body"]:
    if "chunk" in event:
        chunks.append(json.loads(event["chunk"]["bytes"])["type"])
out["invoke_stream_types"] = chunks

r = runtime.count_tokens(modelId=model, input={"invokeModel": {"body": invoke_body}})
out["count_tokens"] = r["inputTokens"]

r = control.get_inference_profile(inferenceProfileIdentifier=profile_arn)
out["get_inference_profile"] = r["inferenceProfileArn"]
r = control.list_inference_profiles()
out["list_inference_profiles"] = len(r["inferenceProfileSummaries"])

print(json.dumps(out))
