"""Pomerium's setting names, so that one this proxy does not take is refused by name.

A Pomerium configuration moved here must never lose a setting silently (Pomerium itself logs
unknown keys and goes on), nor be "corrected" to a different setting by a did-you-mean. The
names were read from Pomerium's sources (pomerium/pomerium ``config/options.go``,
``autocert.go``, ``dns.go``, ``databroker.go``, ``mtls.go``, ``otelconfig/otelconfig.go``,
``config.gen.go``, the removed keys of ``custom.go``'s field checks, and ``config/policy.go``
for routes): the ``mapstructure`` tags, which are both the file keys and, upper-cased, the
environment variables (``bindEnvs``; nested ones joined with ``_``; ``POLICY`` and
``HEADERS`` bound by hand). Pure data and lookups: what is refused is these names minus what
``proxy.config`` accepts, so adding a key there removes it from the refusals.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

# Top-level keys of a Pomerium configuration file.
OPTIONS = frozenset("""
    installation_id pomerium_debug log_level proxy_log_level access_log_fields authorize_log_fields
    shared_secret shared_secret_file services address insecure_server
    dns_lookup_family dns_udp_max_queries dns_use_tcp dns_query_tries dns_query_timeout
    certificates certificate certificate_key certificate_file certificate_key_file
    http_redirect_addr timeout_read timeout_write timeout_idle policy policy_file routes
    authenticate_service_url authenticate_internal_service_url signout_redirect_url
    authenticate_callback_path cookie_name cookie_secret cookie_secret_file cookie_domain
    cookie_http_only cookie_expire cookie_same_site idp_client_id idp_client_secret
    idp_client_secret_file idp_provider idp_provider_url idp_scopes idp_request_params
    idp_access_token_allowed_audiences authorize_service_url authorize_service_urls
    authorize_internal_service_url override_certificate_name certificate_authority
    certificate_authority_file tls_derive signing_key signing_key_file set_response_headers
    headers jwt_claims_headers jwt_issuer_format jwt_groups_filter bearer_token_format
    default_upstream_timeout debug_address metrics_address metrics_basic_auth metrics_certificate
    metrics_certificate_key metrics_certificate_file metrics_certificate_key_file
    metrics_client_ca metrics_client_ca_file tracing_sample_rate tracing_provider
    tracing_otlp_endpoint tracing_otlp_protocol tracing_datadog_address
    tracing_jaeger_collector_endpoint tracing_jaeger_agent_endpoint tracing_zipkin_endpoint
    otel_traces_exporter otel_traces_sampler_arg otel_resource_attributes otel_log_level
    otel_attribute_value_length_limit otel_exporter_otlp_endpoint
    otel_exporter_otlp_traces_endpoint otel_exporter_otlp_protocol
    otel_exporter_otlp_traces_protocol otel_exporter_otlp_headers otel_exporter_otlp_traces_headers
    otel_exporter_otlp_timeout otel_exporter_otlp_traces_timeout otel_bsp_schedule_delay
    otel_bsp_max_export_batch_size grpc_address grpc_insecure grpc_client_timeout
    ssh_address ssh_host_key_files ssh_host_keys ssh_user_ca_key_file ssh_user_ca_key
    ssh_rls_enabled ssh_rls_additional_entries databroker_service_url databroker_service_urls
    databroker_internal_service_url databroker_storage_type databroker_storage_connection_string
    databroker_storage_connection_string_file databroker_cluster_leader_id
    databroker_cluster_node_id databroker_cluster_nodes databroker_raft_bind_address
    downstream_mtls google_cloud_serverless_authentication_service_account use_proxy_protocol
    autocert autocert_ca autocert_email autocert_use_staging autocert_eab_key_id
    autocert_eab_mac_key autocert_must_staple autocert_dir autocert_trusted_ca
    autocert_trusted_ca_file skip_xff_append xff_num_trusted_hops envoy_admin_access_log_path
    envoy_admin_profile_path envoy_admin_address envoy_bind_config_source_address
    envoy_bind_config_freebind programmatic_redirect_domain_whitelist
    mcp_allowed_client_id_domains codec_type pass_identity_headers runtime_flags
    circuit_breaker_thresholds health_check_addr health_check_systemd_disabled allow_upgrades
    auto_apply_changesets
    client_ca client_ca_file idp_service_account idp_refresh_directory_timeout
    idp_refresh_directory_interval idp_qps
""".split())

# Keys of one route (``routes`` / ``policy`` entries).
ROUTE_OPTIONS = frozenset("""
    from to redirect response name description logo_url allowed_users allowed_domains
    allowed_idp_claims prefix path regex regex_priority_order prefix_rewrite
    regex_rewrite_pattern regex_rewrite_substitution host_rewrite host_rewrite_header
    host_path_regex_rewrite_pattern host_path_regex_rewrite_substitution cors_allow_preflight
    allow_public_unauthenticated_access allow_any_authenticated_user timeout idle_timeout
    allow_websockets allow_spdy allow_upgrades tls_skip_verify tls_server_name
    tls_downstream_server_name tls_upstream_server_name tls_custom_ca tls_custom_ca_file
    tls_client_cert tls_client_key tls_client_cert_file tls_client_key_file
    tls_downstream_client_ca tls_downstream_client_ca_file tls_upstream_allow_renegotiation
    set_request_headers remove_request_headers preserve_host_header pass_identity_headers
    kubernetes_service_account_token kubernetes_service_account_token_file
    enable_google_cloud_serverless_authentication jwt_groups_filter sub_policies
    rewrite_response_headers set_response_headers idp_client_id idp_client_secret
    idp_access_token_allowed_audiences identity_providers show_error_details policy depends_on
    mcp circuit_breaker_thresholds upstream_tunnel outlier_detection health_checks
    healthy_panic_threshold load_balancing_policy allowed_groups set_authorization_header
""".split())

# downstream_mtls is a nested struct: Pomerium binds its fields, not itself, to variables.
_NESTED = {"downstream_mtls": ("ca", "ca_file", "crl", "crl_file", "enforcement",
                               "match_subject_alt_names", "max_verify_depth")}

# Environment variable -> the setting it feeds ("downstream_mtls.ca" for a nested one).
ENVIRONMENT: Mapping[str, str] = {
    **{k.upper(): k for k in OPTIONS if k not in _NESTED},
    **{f"{k}_{f}".upper(): f"{k}.{f}" for k, fields in _NESTED.items() for f in fields},
}

# The OpenTelemetry SDK's own variables, which platforms set for every process: a warning
# (this proxy exports no traces), not a refusal that would stop it from starting there.
OTEL_PREFIX = "OTEL_"

# Settings that grant or carry identity: refused with the reason (ignoring one would expose
# a service its owner believes protected). Top-level ``policy`` is the routes list, not this.
IDENTITY_OPTIONS = frozenset("""
    authenticate_service_url authenticate_internal_service_url authenticate_callback_path
    signout_redirect_url cookie_name cookie_secret cookie_secret_file cookie_domain
    cookie_http_only cookie_expire cookie_same_site idp_client_id idp_client_secret
    idp_client_secret_file idp_provider idp_provider_url idp_scopes idp_request_params
    idp_access_token_allowed_audiences idp_service_account idp_refresh_directory_timeout
    idp_refresh_directory_interval idp_qps authorize_service_url authorize_service_urls
    authorize_internal_service_url shared_secret shared_secret_file signing_key signing_key_file
    jwt_claims_headers jwt_issuer_format jwt_groups_filter bearer_token_format
    pass_identity_headers downstream_mtls client_ca client_ca_file
    programmatic_redirect_domain_whitelist
""".split())
IDENTITY_ROUTE_OPTIONS = frozenset("""
    policy allowed_users allowed_domains allowed_idp_claims allowed_groups
    allow_any_authenticated_user sub_policies pass_identity_headers idp_client_id
    idp_client_secret idp_access_token_allowed_audiences identity_providers jwt_groups_filter
    tls_downstream_client_ca tls_downstream_client_ca_file set_authorization_header
""".split())

_NO_AUTH = "this proxy does not authenticate, {} would be public"

# Where this proxy takes the same thing under another name or form.
_INSTEAD = {
    "policy": "use 'routes' instead (the same list; in the environment ROUTES, as YAML or JSON text)",
    "certificate": "use certificate_file instead (a file path, or the PEM text itself, not base64)",
    "certificate_key": "use certificate_key_file instead (a file path, or the PEM text itself, not base64)",
    "proxy_log_level": "use log_level instead",
}


def _refused(what: str, key: str, identity: frozenset, exposed: str) -> str:
    root = key.split(".")[0]
    why = _NO_AUTH.format(exposed) if root in identity else _INSTEAD.get(root, "it has no equivalent here")
    return f"Pomerium {what} {key!r} is not supported by autocert-proxy: {why}"


def refusal(key: str, accepted: Iterable[str]) -> Optional[str]:
    """For a top-level key: the message when it is Pomerium's and not ``accepted``, else None."""
    if key not in OPTIONS or key in accepted:
        return None
    return _refused("setting", key, IDENTITY_OPTIONS, "every route")


def route_refusal(key: str, accepted: Iterable[str]) -> Optional[str]:
    """For a route key: the message when it is Pomerium's and not ``accepted``, else None."""
    if key not in ROUTE_OPTIONS or key in accepted:
        return None
    return _refused("route setting", key, IDENTITY_ROUTE_OPTIONS, "the route")


def environment_refusals(environ: Mapping[str, str], accepted: Iterable[str]) -> tuple[list[str], list[str]]:
    """Pomerium's variables that are set and that this proxy does not read -> (problems, warnings).

    Only Pomerium's exact names count: PATH, HOME, AWS_* and the like are nobody's business here."""
    accepted = frozenset(accepted)
    problems, warnings = [], []
    for name in sorted(environ):
        key = ENVIRONMENT.get(name)
        if key is None or key in accepted or environ[name] == "":   # empty = unset, as in Pomerium
            continue
        if name.startswith(OTEL_PREFIX):
            warnings.append(f"{name} (environment): Pomerium reads it for tracing; autocert-proxy "
                            f"exports no traces, so it has no effect here")
        else:
            problems.append(f"{name} (environment): {_refused('setting', key, IDENTITY_OPTIONS, 'every route')}; "
                            f"unset {name}")
    return problems, warnings
