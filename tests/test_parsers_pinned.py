"""Every accepted and refused form of the configuration's value parsers, pinned one rule at a time.

Each refused value is checked against the part of the message that names its rule, so that a
rule removed (or one rule shadowing another) fails here even when some later rule would still
refuse the value. scripts/mutation.sh measures how well these hold the parsers.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import yaml

from proxy.config import (ConfigError, _Bad, load_config, parse_address, parse_bool, parse_ca_url,
                          parse_duration, parse_upstream, parse_workers)
from proxy.storage import StorageError, check_key, parse_location
from tests.infra.proxyproc import REPO

A63 = "a" * 63


# ----------------------------------------------------------------------------- storage locations

@pytest.mark.parametrize("value,expected", [
    ("s3://abc/p", ("s3", "abc", "p", None)),                        # shortest bucket name
    (f"s3://{A63}/p", ("s3", A63, "p", None)),                       # longest S3 name
    ("s3://0a9/p", ("s3", "0a9", "p", None)),                        # digits at both ends
    ("s3://a-b.c/p", ("s3", "a-b.c", "p", None)),
    ("S3://bkt/p", ("s3", "bkt", "p", None)),                        # the scheme's case is free
    ("  s3://bkt/p  ", ("s3", "bkt", "p", None)),
    ("s3://bkt", ("s3", "bkt", "", None)),
    ("s3://bkt/", ("s3", "bkt", "", None)),
    ("s3://bkt//a/b/", ("s3", "bkt", "a/b", None)),
    ("s3://bkt/XpX/", ("s3", "bkt", "XpX", None)),
    ("s3://my.s3.bucket/p", ("s3", "my.s3.bucket", "p", None)),      # an "s3" label, not a host
    ("s3://bkt.s3.amazonaws.com/p", ("s3", "bkt", "p", "us-east-1")),
    ("s3://my.bkt.s3.amazonaws.com/p", ("s3", "my.bkt", "p", "us-east-1")),
    ("s3://a.b.c.s3.eu-west-3.amazonaws.com/p", ("s3", "a.b.c", "p", "eu-west-3")),
    ("s3://my.bkt.s3.eu-west-3.amazonaws.com/a/b", ("s3", "my.bkt", "a/b", "eu-west-3")),
    ("s3://bkt.s3.EU-WEST-3.amazonaws.com/p", ("s3", "bkt", "p", "eu-west-3")),
    ("s3://s3b.s3.amazonaws.com/p", ("s3", "s3b", "p", "us-east-1")),
    ("gs://a_b-c.d/certs", ("gs", "a_b-c.d", "certs", None)),         # GCS takes '_'
    (f"gs://{A63}", ("gs", A63, "", None)),
    ("gs://" + ".".join([A63] * 3) + ".aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",   # 222 with dots
     ("gs", ".".join([A63] * 3) + "." + "a" * 30, "", None)),
])
def test_storage_urls_accepted(value, expected):
    loc = parse_location(value)
    assert (loc.kind, loc.bucket, loc.prefix, loc.region) == expected
    assert loc.path == ""


def test_directories_expand_home_and_resolve_relative_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert parse_location("~/certs") == parse_location(str(tmp_path / "home" / "certs"))
    assert parse_location("~").path == str(tmp_path / "home")
    loc = parse_location("rel/certs")
    assert (loc.kind, loc.path, loc.bucket, loc.prefix, loc.region) == (
        "file", str(tmp_path / "rel" / "certs"), "", "", None)
    assert parse_location(" /x/y/../z/ ").path == "/x/z"
    assert parse_location("dir with space").path == str(tmp_path / "dir with space")


QUERY = "a query or fragment ('?', '#') is not allowed in the URL"
CREDENTIALS = "credentials ('user@') are not allowed in the URL"
SPACE = "white space or control characters in the URL"
NO_SLASHES = "a storage URL needs '://' after its scheme"
PARTS = "has empty, '.' or '..' components"
NOT_AWS = "is not BUCKET.s3.REGION.amazonaws.com"
ENDPOINT = ("looks like an S3 endpoint, not a bucket; for an S3-compatible store write "
            "s3://BUCKET/PREFIX and set AWS_ENDPOINT_URL_S3")
S3_CHARS, GS_CHARS = "has characters other than a-z 0-9 - .", "has characters other than a-z 0-9 - _ ."
EDGES = "must begin and end with a letter or a digit"
GS222 = ".".join([A63] * 3) + "." + "a" * 31


@pytest.mark.parametrize("value,why", [
    ("", "empty value"),
    ("   ", "empty value"),
    (None, "empty value"),
    (42, "empty value"),
    ("s3:/bkt/p", NO_SLASHES),
    ("GS:bkt", NO_SLASHES),
    ("ftp://bkt/p", "unknown scheme 'ftp'"),
    ("File://bkt/p", "unknown scheme 'file'"),
    ("s3://bkt/p?x=1", QUERY),
    ("s3://bkt?", QUERY),                 # urlsplit sees no query in a bare '?'
    ("s3://bkt/p#f", QUERY),
    ("gs://bkt/p#", QUERY),
    ("s3://user:pw@bkt/p", CREDENTIALS),
    ("s3://user@bkt/p", CREDENTIALS),
    ("s3://bkt:9000/p", "a port is not allowed in the URL"),
    ("gs://bkt:/p", "a port is not allowed in the URL"),
    ("s3://", "missing bucket name"),
    ("s3:///p", "missing bucket name"),
    ("s3://bkt/a/../b", f"prefix 'a/../b' {PARTS}"),
    ("s3://bkt/..", f"prefix '..' {PARTS}"),
    ("gs://bkt/a/./b", f"prefix 'a/./b' {PARTS}"),
    ("s3://bkt/a//b", f"prefix 'a//b' {PARTS}"),
    ("s3://bkt/a\\b", f"prefix 'a\\\\b' {PARTS}"),
    ("s3://bkt/a b", SPACE),
    ("s3://bkt/a\tb", SPACE),            # urlsplit drops tabs silently
    ("s3://bkt/a\nb", SPACE),
    ("s3://bkt/\x7f", SPACE),
    ("s3://bkt/\x00", SPACE),
    ("s3://bkt.s3.eu-west-3.example.com/p", f"host 'bkt.s3.eu-west-3.example.com' {ENDPOINT}"),
    ("s3://bkt.s3.example.com/p", f"host 'bkt.s3.example.com' {ENDPOINT}"),
    ("s3://s3.eu-west-3.amazonaws.com/bkt/p", f"AWS host 's3.eu-west-3.amazonaws.com' {NOT_AWS}"),
    ("s3://s3.amazonaws.com/bkt", f"AWS host 's3.amazonaws.com' {NOT_AWS}"),
    ("s3://bkt.s3-eu-west-1.amazonaws.com/p", f"AWS host 'bkt.s3-eu-west-1.amazonaws.com' {NOT_AWS}"),
    ("s3://bkt.s3.dualstack.eu-west-1.amazonaws.com/p",
     f"AWS host 'bkt.s3.dualstack.eu-west-1.amazonaws.com' {NOT_AWS}"),
    ("s3://amazonaws.com/p", f"AWS host 'amazonaws.com' {NOT_AWS}"),
    ("s3://ab/p", "bucket name 'ab' has 2 characters, S3 bucket names have 3 to 63"),
    (f"s3://{A63}a/p", f"bucket name '{A63}a' has 64 characters, S3 bucket names have 3 to 63"),
    (f"s3://{A63}.b/p", f"bucket name '{A63}.b' has 65 characters, S3 bucket names have 3 to 63"),
    (f"gs://{A63}a", f"bucket name '{A63}a' has 64 characters, GCS bucket names have 3 to 63"),
    ("gs://ab", "bucket name 'ab' has 2 characters, GCS bucket names have 3 to 63"),
    ("gs://a.", "bucket name 'a.' has 2 characters, GCS bucket names have 3 to 222"),
    (f"gs://{GS222}", f"bucket name '{GS222}' has 223 characters, GCS bucket names have 3 to 222"),
    ("s3://.s3.amazonaws.com/p", "bucket name '' has 0 characters, S3 bucket names have 3 to 63"),
    ("s3://Bkt/p", f"bucket name 'Bkt' {S3_CHARS}"),
    ("s3://b_kt/p", f"bucket name 'b_kt' {S3_CHARS}"),          # '_' is GCS only
    ("gs://bücket/p", f"bucket name 'bücket' {GS_CHARS}"),
    ("gs://bkt!/p", f"bucket name 'bkt!' {GS_CHARS}"),
    ("s3://BKT.S3.AMAZONAWS.COM/p", f"bucket name 'BKT' {S3_CHARS}"),
    ("s3://-bkt/p", f"bucket name '-bkt' {EDGES}"),
    ("s3://bkt-/p", f"bucket name 'bkt-' {EDGES}"),
    ("s3://.bkt/p", f"bucket name '.bkt' {EDGES}"),
    ("gs://_bkt", f"bucket name '_bkt' {EDGES}"),
    ("gs://bkt.", f"bucket name 'bkt.' {EDGES}"),
    ("s3://a..b/p", "bucket name 'a..b' has two adjacent periods"),
    ("gs://" + A63 + "a.b", f"bucket name '{A63}a.b' has more than 63 characters between two periods"),
    ("gs://b." + A63 + "a", f"bucket name 'b.{A63}a' has more than 63 characters between two periods"),
    ("s3://192.168.1.1/p", "bucket name '192.168.1.1' is formatted as an IP address"),
    ("gs://10.0.0.1", "bucket name '10.0.0.1' is formatted as an IP address"),
])
def test_storage_locations_refused_by_their_rule(value, why):
    with pytest.raises(StorageError) as e:
        parse_location(value)
    shown = str(value).strip() or str(value)
    assert str(e.value) == (f"autocert_dir={shown!r}: {why}; accepted: a directory path, s3://BUCKET/PREFIX, "
                            "s3://BUCKET.s3.REGION.amazonaws.com/PREFIX or gs://BUCKET/PREFIX")


def test_a_bucket_of_every_accepted_character():
    assert parse_location("s3://" + "abcdefghijklmnopqrstuvwxyz0123456789-.z"[:63]).bucket == \
        "abcdefghijklmnopqrstuvwxyz0123456789-.z"
    assert parse_location("gs://abcdefghijklmnopqrstuvwxyz0123456789-._z").bucket == \
        "abcdefghijklmnopqrstuvwxyz0123456789-._z"


@pytest.mark.parametrize("key,expected", [("a", "a"), ("a/b", "a/b"), ("a/b/", "a/b"), ("a//", "a"), ("aX/", "aX"),
                                          ("a.b/..c", "a.b/..c")])
def test_storage_keys_accepted(key, expected):
    assert check_key(key) == expected


def test_the_root_key_only_where_allowed():
    assert check_key("", allow_root=True) == ""
    assert check_key("/", allow_root=True) == ""
    assert check_key("//", allow_root=True) == ""
    for key in ("", "/"):
        with pytest.raises(StorageError) as e:
            check_key(key)
        assert str(e.value) == "storage key is empty"


@pytest.mark.parametrize("key,why", [
    (None, "storage key must be a string, got NoneType"),
    (b"a", "storage key must be a string, got bytes"),
    ("/a", "storage key '/a' is not a relative '/'-separated path"),
    ("a\\b", "storage key 'a\\\\b' is not a relative '/'-separated path"),
    ("a\x00", "storage key 'a\\x00' is not a relative '/'-separated path"),
    ("a//b", "storage key 'a//b' contains an empty, '.' or '..' component"),
    ("./a", "storage key './a' contains an empty, '.' or '..' component"),
    ("a/../b", "storage key 'a/../b' contains an empty, '.' or '..' component"),
    ("..", "storage key '..' contains an empty, '.' or '..' component"),
])
def test_storage_keys_refused(key, why):
    with pytest.raises(StorageError) as e:
        check_key(key, allow_root=True)
    assert str(e.value) == why


def test_ip_like_names_with_other_shapes_are_buckets():
    assert parse_location("s3://1.2.3/p").bucket == "1.2.3"
    assert parse_location("gs://1.2.3.4.5").bucket == "1.2.3.4.5"


def test_autocert_dir_in_the_config_expands_home_and_resolves_from_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = tmp_path / "etc" / "proxy.yaml"
    cfg.parent.mkdir()
    for value, expected in [("~/certs", tmp_path / "home" / "certs"),
                            ("certs", tmp_path / "etc" / "certs"),
                            ("../var/certs", tmp_path / "var" / "certs")]:
        cfg.write_text(yaml.safe_dump({"autocert_dir": value}))
        assert load_config(str(cfg), {}).autocert_dir == str(expected), value


# ----------------------------------------------------------------------------- durations

ACCEPTED_DURATION = 'accepted: a number of seconds or a duration like "30s", "1m30s", "500ms", "2h"'
TOO_LONG = "is longer than the longest duration (about 292 years)"


@pytest.mark.parametrize("value,seconds", [
    (30, 30.0), (0.25, 0.25), ("30", 30.0), ("2.", 2.0), (".5", 0.5), ("  30s  ", 30.0),
    ("30s", 30.0), ("1m30s", 90.0), ("1h30m", 5400.0), ("1.5h", 5400.0), (".5s", 0.5),
    ("500ms", 0.5), ("2us", 2e-6), ("2µs", 2e-6), ("2μs", 2e-6), ("3ns", 3e-9), ("1s1s", 2.0),
    ("+30s", 30.0), ("+2", 2.0),
    ("9223372036s", 9223372036.0), ("2562047h", 2562047 * 3600.0),   # within Go's int64 ns
])
def test_durations_accepted(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds, rel=1e-12)


@pytest.mark.parametrize("value,rule", [
    ("30sx", "is not a duration"), ("1m30", "is not a duration"), ("30 s", "is not a duration"),
    ("s", "is not a duration"), ("", "is not a duration"), ("  ", "is not a duration"),
    ("30S", "is not a duration"), ("1e3s", "is not a duration"), ("--5s", "is not a duration"),
    ("-", "is not a duration"), ("+", "is not a duration"), ("٣٠s", "is not a duration"),
    ("inf", "is not a duration"), ("nan", "is not a duration"), ("1d", "is not a duration"),
    (float("inf"), "is not a duration"), (float("-inf"), "is not a duration"),
    (float("nan"), "is not a duration"), (True, "is not a duration"), (None, "is not a duration"),
    ([30], "is not a duration"),
    (0, "must be greater than zero"), (0.0, "must be greater than zero"), ("0s", "must be greater than zero"),
    ("0", "must be greater than zero"), (-5, "must be greater than zero"),
    ("-5s", "must be greater than zero"), ("-5", "must be greater than zero"),
    ("-0s", "must be greater than zero"),
    ("9223372037s", TOO_LONG), ("2562048h", TOO_LONG), (1e10, TOO_LONG),
    ("9" * 300, TOO_LONG), ("9" * 400 + "s", "is not a duration"),   # 1e400 is infinite
])
def test_durations_refused_by_their_rule(value, rule):
    with pytest.raises(_Bad) as e:
        parse_duration(value)
    assert str(e.value) == f"{value!r} {rule}; {ACCEPTED_DURATION}"


def test_the_longest_duration_is_gos():
    longest = (2 ** 63 - 1) / 1e9
    assert parse_duration(longest) == longest
    assert parse_duration("9223372036854775807ns") == pytest.approx(longest)
    too_long = math.nextafter(longest, math.inf)
    with pytest.raises(_Bad, match="is longer than the longest duration"):
        parse_duration(too_long)


# ----------------------------------------------------------------------------- booleans, workers

BOOL_FORMS = "true, TRUE, True, 1, t, T, false, FALSE, False, 0, f, F"


@pytest.mark.parametrize("value,expected", [
    (True, True), (False, False), (1, True), (0, False),
    *[(s, True) for s in ("true", "TRUE", "True", "1", "t", "T")],
    *[(s, False) for s in ("false", "FALSE", "False", "0", "f", "F")],
])
def test_booleans_accepted(value, expected):
    assert parse_bool(value) is expected


@pytest.mark.parametrize("value", [2, -1, 10, 1.0, 0.0, "2", "yes", "no", "on", "off", "tRUE", " true",
                                   "", None, [], "y"])
def test_booleans_refused(value):
    with pytest.raises(_Bad) as e:
        parse_bool(value)
    assert str(e.value) == f"{value!r} is not a boolean; accepted: {BOOL_FORMS}"


def test_yaml_integer_two_is_not_a_boolean(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("autocert: 2\nautocert_must_staple: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg), {})
    assert e.value.problems == [f"autocert: 2 is not a boolean; accepted: {BOOL_FORMS}"]


@pytest.mark.parametrize("value,expected", [(1, 1), (4, 4), ("4", 4), (" 12 ", 12), ("auto", 3),
                                            (" AUTO ", 3), ("Auto", 3)])
def test_workers_accepted(value, expected):
    assert parse_workers(value, cpu_count=lambda: 3) == expected


@pytest.mark.parametrize("value", [0, -1, "0", "-1", True, False, 1.5, "1.5", "", "²", "٣", "four", None])
def test_workers_refused(value):
    with pytest.raises(_Bad) as e:
        parse_workers(value, cpu_count=lambda: 3)
    assert str(e.value) == f"{value!r} is not a worker count; accepted: a positive integer or \"auto\""


def test_auto_workers_without_a_known_core_count_is_one():
    assert parse_workers("auto", cpu_count=lambda: None) == 1
    assert parse_workers("auto", cpu_count=lambda: 0) == 1


# ----------------------------------------------------------------------------- addresses and URLs

@pytest.mark.parametrize("value,expected", [(":1", ("", 1)), (":65535", ("", 65535)),
                                            ("127.0.0.1:443", ("127.0.0.1", 443)),
                                            ("[::1]:8443", ("::1", 8443)),
                                            ("Proxy.Example.com.:80", ("proxy.example.com", 80))])
def test_addresses_accepted(value, expected):
    a = parse_address(value)
    assert (a.host, a.port) == expected


@pytest.mark.parametrize("value", [":0", ":65536", ":", ":x", ":²", ":٤٤٣", ": 443", ":+443", "[::1]:0",
                                   "[::1]:²"])
def test_address_ports_refused(value):
    with pytest.raises(_Bad) as e:
        parse_address(value)
    assert "is not a number from 1 to 65535" in str(e.value)


def test_unicode_digits_are_a_config_error_not_a_crash(tmp_path):
    """str.isdigit() takes '²', which int() refuses: the ValueError escaped load_config."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"address": ":²", "workers": "²",
                                   "routes": [{"from": "https://a.test", "to": "http://127.0.0.1:9"}]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOCERT", "ADDRESS", "WORKERS"))}
    r = subprocess.run([sys.executable, "-m", "proxy", "--config", str(cfg), "--check"],
                       capture_output=True, text=True, env=env, cwd=str(REPO), timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert "address: ':²': port '²' is not a number from 1 to 65535" in r.stderr, r.stderr
    assert "workers: '²' is not a worker count" in r.stderr, r.stderr


CA_ACCEPTED = "accepted: an https:// ACME directory URL, or http:// only for 127.0.0.1, ::1 or localhost"


@pytest.mark.parametrize("value", [
    "https://ca.test/dir", "HTTPS://ca.test/dir", "https://ca.test:14000/dir", "https://ca.test:65535/dir",
    "https://10.0.0.1/dir", "https://[2001:db8::1]:443/dir", "http://127.0.0.1:14000/dir",
    "http://localhost/dir", "http://LOCALHOST:80/dir", "http://[::1]:14000/dir", "https://ca.test/dir?x=1",
])
def test_ca_urls_accepted(value):
    assert parse_ca_url("  " + value + " ") == value


@pytest.mark.parametrize("value,rule", [
    ("https://ca.test:0/dir", "port 0 cannot be connected to"),
    ("https://ca.test:65536/dir", "is not a valid URL"),
    ("https://ca.test:x/dir", "is not a valid URL"),
    ("https://ca.test:-1/dir", "is not a valid URL"),
    ("https://ca.test:٤٤٣/dir", "is not a valid URL"),
    ("https://[::1/dir", "is not a valid URL"),
    ("ftp://ca.test/dir", "is not accepted"),
    ("acme://ca.test/dir", "is not accepted"),
    ("ca.test/dir", "is not accepted"),
    ("https:ca.test/dir", "is not accepted"),
    ("https:///dir", "is not accepted"),
    ("http://ca.test/dir", "uses plain http to a remote host"),
    ("http://127.0.0.2/dir", "uses plain http to a remote host"),
    ("http://localhost.ca.test/dir", "uses plain http to a remote host"),
    ("https://ca .test/dir", "has white space or control characters"),
    ("https://ca\t.test/dir", "has white space or control characters"),   # urlsplit drops the tab
    ("https://ca.test/d\nir", "has white space or control characters"),
    ("https://ca.test/\x7f", "has white space or control characters"),
    ("https://user:pw@ca.test/dir", "has user information"),
    ("https://user@ca.test/dir", "has user information"),
    ("https://ca!.test/dir", "is not a valid DNS name"),
    ("https://-ca.test/dir", "is not a valid DNS name"),
    ("https://*.ca.test/dir", "may not be a wildcard"),
])
def test_ca_urls_refused_by_their_rule(value, rule):
    with pytest.raises(_Bad) as e:
        parse_ca_url(value)
    msg = str(e.value)
    assert msg.startswith(repr(value)), msg
    assert rule in msg, msg
    if rule != "has user information":
        assert msg.endswith(CA_ACCEPTED), msg


def test_ca_url_must_be_a_string():
    with pytest.raises(_Bad, match="is not a string; expected an ACME directory URL"):
        parse_ca_url(443)


@pytest.mark.parametrize("value,rule", [
    ("http://127.0.0.1:0", "port 0 cannot be connected to"),
    ("http://127.0.0.1:65536", "is not a valid URL"),
    ("http://127.0.0.1:x", "is not a valid URL"),
    ("ftp://127.0.0.1:21", "scheme 'ftp' is not accepted"),
    ("https://127.0.0.1:8443", "https upstreams are not supported yet"),
    ("http://u:p@127.0.0.1:80", "has user information"),
])
def test_upstream_urls_refused_by_their_rule(value, rule):
    with pytest.raises(_Bad) as e:
        parse_upstream(value)
    assert rule in str(e.value), str(e.value)


def test_upstream_ports():
    assert parse_upstream("http://127.0.0.1").port == 80
    assert parse_upstream("http://127.0.0.1:1").port == 1
    assert parse_upstream("HTTP://Up.Test:65535/").port == 65535
