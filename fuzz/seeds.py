#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/: a handful of valid inputs per target, built here
from the formats in docs/protocol.md so the fuzzers start from inputs that get past the first checks.
Re-run after a format changes:  python3 fuzz/seeds.py"""
import hashlib
import json
import os
import shutil
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
H1 = hashlib.sha256(b"chunk-1").hexdigest()  # 64 hex chars, as ids are in JSON
H2 = hashlib.sha256(b"chunk-2").hexdigest()
NODE = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"  # a valid ed25519 key
SIG = "ab" * 64


def write(target, name, data):
    os.makedirs(os.path.join(ROOT, target), exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    elif not isinstance(data, bytes):
        data = json.dumps(data, separators=(",", ":")).encode()
    with open(os.path.join(ROOT, target, name), "wb") as f:
        f.write(data)


# request_frame: u16 BE length, version 1, flags (1 range, 2 origin hint, 4 receipt), hash, fields.
def request(flags, rng=None, url=None, offset=0, length=0, receipt=None):
    body = bytes([1, flags]) + hashlib.sha256(b"c").digest()
    if rng:
        body += struct.pack(">II", *rng)
    if url is not None:
        body += struct.pack(">QIH", offset, length, len(url)) + url.encode()
    if receipt is not None:
        body += struct.pack(">H", len(receipt)) + receipt
    return struct.pack(">H", len(body)) + body


def signed(payload):
    return {"node_id": NODE, "payload": json.dumps(payload, separators=(",", ":")), "signature": SIG}


def main():
    shutil.rmtree(ROOT, ignore_errors=True)
    receipt_json = json.dumps({"commitment": signed({"session": "00" * 16}), "index": 3, "preimage": H2}).encode()
    write("request_frame", "whole", request(0))
    write("request_frame", "range", request(1, rng=(1024, 4096)))
    write("request_frame", "hint", request(2, url="http://o.example/vod/a.mp4", offset=1 << 20, length=1 << 20))
    write("request_frame", "receipt_only", request(4, receipt=receipt_json))
    write("request_frame", "all", request(7, rng=(0, 10), url="https://o.example/x", length=16384, receipt=b"{}"))

    write("response_head", "ok", bytes([0, 0, 16, 0, 0]))
    write("response_head", "not_found", bytes([1, 0, 9]) + b"not found")
    write("response_head", "busy_empty", bytes([6, 0, 0]))
    write("response_head", "peer_busy", bytes([2]))
    write("response_head", "utf8_message", bytes([7, 0, 4]) + "é!".encode() + b"!")

    frames = {
        "attach": {"type": "attach", "attach": signed({"rendezvous": NODE, "timestamp_ms": 1})},
        "attached": {"type": "attached", "observed": "203.0.113.7:7701"},
        "punch": {"type": "punch", "target": NODE},
        "punch_request": {"type": "punch_request", "client": "[2001:db8::1]:4433"},
        "punch_sent": {"type": "punch_sent"},
        "punch_ready": {"type": "punch_ready", "addr": "198.51.100.2:9"},
        "error": {"type": "error", "message": "not attached"},
    }
    for name, f in frames.items():
        body = json.dumps(f, separators=(",", ":")).encode()
        write("rendezvous_frame", name, struct.pack(">H", len(body)) + body)
    write("rendezvous_frame", "attach_payload", {"rendezvous": NODE, "timestamp_ms": 1700000000000})

    stats = {k: 1 for k in ["cache_used", "cache_capacity", "cached_chunks", "active_streams", "requests", "hits",
                            "misses", "bytes_served", "origin_fills", "origin_bytes", "corrupt_chunks",
                            "bad_requests", "store_errors"]}
    overlay = {"reachability": "public", "addrs": ["/ip4/203.0.113.7/udp/7702/quic-v1"],
               "rtt": [{"peer": NODE, "rtt_ms": 12.5}], "tracker_rtt_ms": 30.0, "rendezvous": None,
               "external_quic": "203.0.113.7:7701", "bad_peers": [], "connected_peers": 3}
    register = {"quic_addr": "0.0.0.0:7701", "cache_capacity": 1 << 30, "upload_limit": None, "version": "0.1.0",
                "timestamp_ms": 1700000000000}
    heartbeat = {"timestamp_ms": 1700000000000, "stats": stats, "draining": False, "overlay": overlay}
    manifest = {"url": "http://o.example/a.mp4", "size": 40000, "chunk_size": 16384, "chunks": [H1, H2, H1],
                "content_type": "video/mp4", "etag": "\"x\""}
    api = {
        "signed_register": signed(register),
        "register": register,
        "heartbeat": heartbeat,
        "redeem_batch": {"timestamp_ms": 1, "receipts": [json.loads(receipt_json)]},
        "receipt": json.loads(receipt_json),
        "client_report": {"fog_bytes": 10, "origin_bytes": 2, "passthrough_bytes": 0,
                          "node_failures": [{"node": NODE, "reason": "timeout", "count": 1}],
                          "node_rtt": [{"peer": NODE, "rtt_ms": 20.0}]},
        "register_response": {"heartbeat_interval_secs": 10, "advertised_addr": "203.0.113.7:7701",
                              "origins": ["http://o.example/"], "tracker_key": NODE, "reachable": True,
                              "peers": [{"id": NODE, "addrs": ["/ip4/1.2.3.4/tcp/1"], "rendezvous": "1.2.3.4:5"}]},
        "heartbeat_response": {"registered": True, "origins": ["https://v.example/vod/"], "peers": []},
        "resolve": {"content_id": H1, "manifest": manifest,
                    "nodes": [{"id": NODE, "addr": "127.0.0.1:7701"},
                              {"id": NODE, "addr": "10.0.0.1:1", "via": {"id": NODE, "addr": "1.2.3.4:5"}}],
                    "schedule": [[0, 1], [1], []]},
        "api_error": {"error": "rate_limited", "message": "slow down", "retryable": True},
        "tracker_stats": {**{k: 0 for k in ["nodes_total", "nodes_healthy", "manifests", "cache_used",
                                            "cache_capacity", "bytes_served", "origin_fill_bytes", "resolves",
                                            "ingests", "ingest_errors"]},
                          "nodes_by_reachability": {"public": 1}},
    }
    for name, v in api.items():
        write("api_json", name, v)

    write("manifest", "three_chunks", manifest)
    write("manifest", "empty_object", {"url": "http://o.example/e", "size": 0, "chunk_size": 1048576, "chunks": []})
    write("manifest", "one_byte", {"url": "https://o.example/b", "size": 1, "chunk_size": 16384, "chunks": [H2]})
    write("manifest", "bad_chunk_size", {"url": "x", "size": 5, "chunk_size": 1, "chunks": [H1, H1, H1, H1, H1]})

    # playlist: the first byte picks the playlist's URL (see BASES in the target), the rest is the text.
    hls_master = ("#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=800000,RESOLUTION=640x360\nlow/index.m3u8\n"
                  "#EXT-X-STREAM-INF:BANDWIDTH=2000000\nhttps://cdn.example/high/index.m3u8\n"
                  "#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"a\",URI=\"../audio/en.m3u8\"\n")
    hls_media = ("#EXTM3U\n#EXT-X-TARGETDURATION:4\n#EXT-X-MAP:URI=\"init.mp4\"\n"
                 "#EXT-X-KEY:METHOD=AES-128,URI=\"/keys/k1\"\n#EXTINF:4.0,\nseg0.ts\n#EXTINF:4.000,title\n"
                 "//cdn2.example/seg1.ts\n#EXT-X-BYTERANGE:1000@0\n#EXTINF:2.5,\n/abs/seg2.ts\n#EXT-X-ENDLIST\n")
    dash = ("<?xml version=\"1.0\"?>\n<MPD xmlns=\"urn:mpeg:dash:schema:mpd:2011\"><BaseURL>http://o.example/dash/"
            "</BaseURL><Period><AdaptationSet><SegmentTemplate media=\"chunk-$Number$.m4s\" "
            "initialization=\"/dash/init.mp4\"/><SegmentList><SegmentURL media=\"../x/1.m4s\"/></SegmentList>"
            "</AdaptationSet></Period></MPD>\n")
    write("playlist", "hls_master", b"\x00" + hls_master.encode())
    write("playlist", "hls_media", b"\x01" + hls_media.encode())
    write("playlist", "hls_media_crlf", b"\x05" + hls_media.replace("\n", "\r\n").encode())
    write("playlist", "dash", b"\x02" + dash.encode())
    write("playlist", "dash_v6", b"\x03" + dash.encode())

    for i, (size, header) in enumerate([(100, "bytes=0-9"), (100, "bytes=-10"), (100, "bytes=90-"),
                                        (1 << 40, "bytes=50-500"), (100, "bytes=0-1,5-6"), (0, "bytes=0-")]):
        write("range", f"range{i}", struct.pack(">Q", size) + header.encode())

    for i, u in enumerate(["https://B.EXAMPLE:443/vod/./a/../1.ts?q=1#frag", "http://a.example/vod/%2e%2E/x",
                           "https://b.example/vod\\..\\private/1.ts", "http://[::1]:8080/x?y",
                           "http://user:pw@h.example/", "/http/o.example:81/a/b.m3u8", "/https/h/?q=1",
                           "http://xn--bcher-kva.example/\u00e9"]):
        write("urls", f"url{i}", u)


if __name__ == "__main__":
    main()
