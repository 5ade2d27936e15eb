//! The command line's parsing: defaults, accepted values, refusals with the option named.

use super::*;
use clap::CommandFactory;

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
    assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
    assert!(parse_duration("").is_err());
    assert!(parse_duration("abc").is_err());
    assert!(parse_duration("5 parsecs").is_err());
    assert!(parse_duration("1e400").is_err());
    // Formats `udpring load` relies on (it used to have its own parser).
    assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
    assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    assert!(parse_duration("ms").is_err());
    assert!(parse_duration("10 parsecs").is_err());
    assert!(parse_duration("-1s").is_err());
}

fn serve(args: &[&str]) -> ServeArgs {
    let cli = Cli::try_parse_from(["udpring", "serve"].iter().chain(args))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    match cli.command {
        Command::Serve(s) => *s,
        other => panic!("not serve: {other:?}"),
    }
}

#[test]
fn no_options_is_the_library_default() {
    let args = serve(&[]);
    let (got, want) = (args.config(), ServerConfig::default());
    // ServerConfig has no PartialEq (a library type need not promise one); its Debug
    // lists every field.
    assert_eq!(format!("{got:?}"), format!("{want:?}"));
    assert_eq!(
        args.stats_interval(),
        None,
        "the stats line is off by default"
    );
}

#[test]
fn options_reach_the_config() {
    let c = serve(&[
        "--workers=3",
        "--batch-wait=20us",
        "--idle-timeout=1500ms",
        "--max-sessions-per-worker=10",
        "--max-new-sessions-per-sec=none",
        "--no-gso",
        "--stats-interval=2s",
    ]);
    assert_eq!(c.stats_interval(), Some(Duration::from_secs(2)));
    let c = c.config();
    assert_eq!(c.workers, 3);
    assert_eq!(c.batch_wait, Some(Duration::from_micros(20)));
    assert_eq!(c.idle_timeout, Duration::from_millis(1500));
    assert_eq!(c.max_sessions_per_worker, 10);
    assert_eq!(c.max_new_sessions_per_sec, u32::MAX);
    assert!(!c.gso);
    assert!(serve(&["--busy-poll=0"]).config().busy_poll.is_none());
}

#[test]
fn load_balancer_options_parse_and_are_checked() {
    let d = serve(&[]);
    assert_eq!((d.quic_server_id.clone(), d.quic_lb_config_id), (None, 0));
    let c = serve(&["--quic-server-id=0a0B0c", "--quic-lb-config-id=6"]);
    assert_eq!(c.quic_server_id, Some(ServerId(vec![0x0a, 0x0b, 0x0c])));
    assert_eq!(c.quic_lb_config_id, 6);
    for bad in [
        &["--quic-server-id=abc"][..],
        &["--quic-server-id=zz"],
        &["--quic-server-id="],
        &["--quic-server-id=000102030405060708090a0b0c0d0e0f"],
        &["--quic-server-id=01", "--quic-lb-config-id=7"],
        &["--quic-lb-config-id=1"],
    ] {
        let mut argv = vec!["udpring", "serve"];
        argv.extend_from_slice(bad);
        assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
    }
}

#[test]
fn resumption_options_parse() {
    let d = serve(&[]);
    assert!(!d.no_0rtt, "0-RTT is on by default");
    assert_eq!(d.session_cache, udpring::quic::DEFAULT_SESSION_CACHE);
    assert_eq!(
        d.session_lifetime.0,
        udpring::quic::DEFAULT_SESSION_LIFETIME
    );
    let c = serve(&["--no-0rtt", "--session-cache=10", "--session-lifetime=1h"]);
    assert!(c.no_0rtt);
    assert_eq!(c.session_cache, 10);
    assert_eq!(c.session_lifetime.0, Duration::from_secs(3600));
    assert!(Cli::try_parse_from(["udpring", "serve", "--session-lifetime=0s"]).is_err());
}

/// The command line names its own enums for the library's (which carry no clap
/// derive): each name reaches the config as the mode it names, and back.
#[test]
fn session_modes_steering_and_apps_by_name() {
    for (name, mode) in [
        ("none", SessionMode::None),
        ("shared", SessionMode::Shared),
        ("connected", SessionMode::Connected),
        ("port-per-client", SessionMode::PortPerClient),
    ] {
        let flag = format!("--sessions={name}");
        assert_eq!(serve(&[&flag]).config().sessions, mode, "{name}");
        assert_eq!(cli_name(Sessions::from(mode)), name);
    }
    for (name, steer) in [("none", Steer::None), ("cpu", Steer::Cpu)] {
        let flag = format!("--steer={name}");
        assert_eq!(
            serve(&[&flag, "--pin-cpus"]).config().steer,
            steer,
            "{name}"
        );
        assert_eq!(cli_name(SteerArg::from(steer)), name);
    }
    for (name, app) in [
        ("echo", App::Echo),
        ("discard", App::Discard),
        ("sockperf", App::Sockperf),
        ("quic", App::Quic),
    ] {
        assert_eq!(serve(&["--app", name]).app, app);
    }
    assert!(Cli::try_parse_from(["udpring", "serve", "--sessions=connect"]).is_err());
}

fn cli_name(value: impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

#[test]
fn durations_and_limits_print_as_they_parse() {
    for d in [
        Duration::ZERO,
        Duration::from_secs(30),
        Duration::from_millis(900),
        Duration::from_micros(20),
        Duration::from_nanos(1500),
    ] {
        assert_eq!(Dur(d).to_string().parse::<Dur>(), Ok(Dur(d)), "{d:?}");
    }
    assert_eq!(Dur(Duration::from_secs(30)).to_string(), "30s");
    assert_eq!(Limit(u32::MAX).to_string(), "none");
    assert_eq!("none".parse::<Limit<usize>>(), Ok(Limit(usize::MAX)));
    assert_eq!("7".parse::<Limit<u32>>(), Ok(Limit(7)));
    assert!("seven".parse::<Limit<u32>>().is_err());
}

#[test]
fn a_zero_metrics_timeout_is_refused() {
    assert!(Cli::try_parse_from(["udpring", "serve", "--metrics-timeout", "0"]).is_err());
    let cli =
        Cli::try_parse_from(["udpring", "serve", "--metrics-timeout", "250ms"]).expect("parses");
    let Command::Serve(args) = cli.command else {
        panic!("serve");
    };
    assert_eq!(args.metrics_limits().timeout, Duration::from_millis(250));
}

#[test]
fn help_shows_the_defaults() {
    Cli::command().debug_assert();
    let mut cmd = Cli::command();
    let serve = cmd.find_subcommand_mut("serve").expect("serve subcommand");
    let help = serve.render_long_help().to_string();
    let d = ServerConfig::default();
    for expected in [
        format!("[default: {}]", d.bind),
        format!("[default: {}]", d.buffers),
        format!("[default: {}]", Dur(d.idle_timeout)),
        "[default: none]".to_string(),
        "[default: 0]".to_string(),
        format!("[default: {}]", Dur(crate::metrics::TIMEOUT)),
        format!(
            "at most {} connections at once",
            crate::metrics::MAX_CONNECTIONS
        ),
    ] {
        assert!(help.contains(&expected), "{expected} missing:\n{help}");
    }
}
