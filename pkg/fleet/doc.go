// Package fleet makes the node-mirrors of a cluster one cache: membership, the owner of
// each chunk of each blob, and the authenticated peer API through which members ask
// owners for chunks and for manifests by digest.
//
// # Membership
//
// Start joins the fleet with hashicorp/memberlist (SWIM gossip over TCP and UDP on
// Config.GossipListen). Gossip is encrypted (AES-GCM) with a key derived from the fleet
// key, so a node with another key cannot join: its join fails and no member lists it.
// Config.Join names members by address or DNS name (a Kubernetes headless Service); they
// are joined in the background, with backoff, until one answers, and again whenever this
// node finds itself alone. Every 15 s or so a member also tries to join one member it saw
// fail, so the two sides of a partition become one fleet again once the network heals
// (within the 10 minutes a failed member stays listed; after that, through Join when a
// side is a single node, or a restart). Each member's memberlist metadata is JSON
// {"v":1,"peer":"host:port"} carrying its peer API address (Config.PeerAdvertise).
//
// Members lists the members with their state: alive (memberlist's live set, which counts
// a suspect member alive until it is declared dead; memberlist does not expose suspicion),
// leaving (it announced its Close: no longer asked for chunks), left, or dead. Close
// announces the leave by metadata and by a direct message to each member, lets the peer
// API finish the chunks in flight, then leaves. A killed member is declared dead within
// seconds (see memberlistConfig for the settings and why).
//
// # Owners
//
// Owners(dgst, chunk) ranks the live members, this node included, by rendezvous (highest
// random weight) hashing of (digest, chunk index): [0] owns the chunk, and the rest is the
// order in which to look when the owner lacks it, [1] being where the chunk went before
// [0] joined. Every member computes the same order from the same membership. A member
// leaving moves only its own chunks. Members in quarantine (ReportFault) or backing off
// after failed fetches are left out. A manifest by digest is owned like chunk 0 of a blob
// of that digest: Owners(dgst, 0). Tags are not asked of peers: each node resolves them
// against upstream itself (HEADs are cheap, and Docker Hub does not count them).
//
// # Peer API
//
// Handler (or Serve, which runs it with timeouts and optional TLS) serves only
//
//	GET|HEAD /peer/v1/blobs/<digest>?registry=<host[:port]>&repo=<name>&size=<n>&offset=<n>&length=<n>&hop=<0|1>
//	GET|HEAD /peer/v1/manifests/<digest>?registry=<host[:port]>&repo=<name>&hop=<0|1>
//
// Every request carries X-Node-Mirror-Peer (the sender's name), X-Node-Mirror-Time (Unix
// seconds) and X-Node-Mirror-Signature: hex HMAC-SHA256, under a second key derived from
// the fleet key, of "node-mirror-peer-v1", the method, the request target exactly as sent
// (path and raw query), the time and the name, each followed by a newline. A request that
// lacks them, does not verify, or is more than 30 s from the receiver's clock is answered
// 401 and nothing else; a captured request can be replayed only within that window and
// only for the same chunk or manifest. Then the parameters are checked (sha256 or sha512
// digest, registry host[:port], repository per the distribution name grammar, counts as
// plain decimals, 1 <= length <= Config.MaxChunkSize, offset+length <= size, hop 0 or 1;
// each parameter exactly once and no other); only then is the source asked.
//
// A chunk response is exactly length bytes with Content-Length; if the ChunkSource fails
// midway the connection is cut, never ended clean. A manifest response is the body the
// source's OpenManifest returns, with Content-Length and its media type (bare, lower-case)
// as Content-Type; the source serves manifests only if it also implements ManifestSource
// (otherwise they are 404), and a body over Config.MaxManifestSize (default 4 MiB, the
// mirror's own limit) or a media type that is not one is answered 503 rather than sent.
// Errors are the OCI envelope {"errors":[{"code","message"}]}: the source's ErrNotFound
// is 404 (BLOB_UNKNOWN, MANIFEST_UNKNOWN), ErrTooManyRequests 429, anything else 503;
// other paths 404, other methods 405. HEAD answers as GET would, without the body: it
// opens the chunk or manifest (so it may start a download) and closes it. Bytes sent
// count per peer and in node_mirror_peer_bytes_total, manifests as chunks.
//
// Fetch is the client for chunks: it signs, dials the member's PeerAddr
// (Config.DialTimeout, 500 ms), waits Config.HeaderTimeout (3 s) for headers, requires
// 200 and Content-Length == length, and returns a body that fails (never ends early) when
// the peer sends less, nothing for Config.IdleTimeout (5 s), or, once reads have waited
// that long in all, under 64 KiB/s on average over the waiting. FetchManifest is the
// client for manifests, with the same timeouts: it requires 200, a Content-Length of at
// most Config.MaxManifestSize (it never reads more) and one Content-Type that is a media
// type, and fails when the body is shorter than declared or stalls. Neither verifies the
// digest; a manifest's media type is the peer's word, covered by no digest. Their errors
// are *FetchError with a Reason for NoteFallback. Failures to reach a member, timeouts,
// refusals and broken responses put the member in a short backoff (1 s doubling to 30 s,
// reset by a success); a 404, 429 or 503 is an answer and does not. ReportFault is for
// what only the caller can see: bytes that failed verification, or a member that keeps
// failing; three within 10 minutes quarantine it for 10 minutes.
//
// # Integration
//
// The mirror implements ChunkSource and, for each chunk it lacks, asks Owners; when [0]
// is itself it serves the chunk from its store, its download or upstream, and otherwise
// Fetches it, verifies the whole blob as for upstream bytes, and on any failure falls back
// to upstream and calls NoteFallback(FallbackReason(err)) (and ReportFault(name) when the
// bytes were wrong). For a manifest by digest it lacks, it asks Owners(dgst, 0) the same
// way with FetchManifest, verifies the body against the digest and its media type
// against the body, and falls back to upstream likewise. It also implements
// ManifestSource. A source asked with Hop 1 must not ask another member. The daemon runs
// Serve on its --peer-listen listener and calls Close on shutdown.
//
// Metrics (on Config.Registerer): node_mirror_fleet_members (live members),
// node_mirror_peer_bytes_total{direction="in"|"out"}, node_mirror_peer_fallbacks_total
// {reason="down"|"timeout"|"refused"|"fault"|"error"}, node_mirror_peer_faults_total.
// Stats reports each member with the bytes exchanged with it, for `status`.
package fleet
