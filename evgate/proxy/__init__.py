"""
The HTTP proxy: synchronous APIs behind the same plans, limits, CORS,
logs and metrics as event APIs (docs/proxy.md).

It is an endpoint and an entrypoint that do not use the hub:

 - L{evgate.proxy.endpoint}: C{[endpoint:NAME] type = http}, the upstream
   targets, their connection pool, load balancing and health
   (L{evgate.proxy._pool});
 - L{evgate.proxy.entrypoint}: the C{http-proxy} entrypoint of an API,
   which owns the API path's subtree and forwards each request
   (L{evgate.proxy._forward} and L{evgate.proxy._requestbody}, and
   L{evgate.proxy._upgrade} for WebSocket)
   with the header rules of L{evgate.proxy._headers}.

The route is the gateway's: request -> L{evgate.gateway.GatewayResource}
(exact path, else the subtree of a proxy API) -> plans -> limits ->
entrypoint -> upstream.
"""
