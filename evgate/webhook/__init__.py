"""
Webhook delivery: the machinery behind the C{webhook} entrypoint
(L{evgate.entrypoints.webhook}).

 - L{evgate.webhook.records}: subscriptions as stored records;
 - L{evgate.webhook.signing}: Standard Webhooks secrets and signatures;
 - L{evgate.webhook.ssrf}: which callback addresses may be called;
 - L{evgate.webhook.retry}: backoff, Retry-After and outcomes;
 - L{evgate.webhook.delivery}: one subscription's deliveries in order,
   with L{evgate.webhook.headers} (what a delivery carries) and
   L{evgate.webhook.writes} (its coalesced store writes);
 - L{evgate.webhook.client}: the HTTP client side: connection reuse,
   TLS trust (C{webhook-ca-file}), describing requests that got no answer;
 - L{evgate.webhook.feeds}: where a subscription's messages come from
   (the hub, an MQTT share group) and L{evgate.webhook.kafka} (a Kafka
   consumer group);
 - L{evgate.webhook.service}: every subscription of the node.

See docs/entrypoints/webhook.md for what this promises receivers.
"""
