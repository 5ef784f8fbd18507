//! `explain NAME`: a failure name's documentation from the taxonomy (when it is reported, its
//! typical root cause, what to look at), for an engineer holding a PostHog event or a `decrypt`
//! line.

use to_device_crypto::FailureReason;

use super::CliResult;

/// Parses a full analytics name (`ToDeviceFailedToDecrypt_SessionWedged`) or a short reason
/// (`SessionWedged`), ignoring case; an unknown name lists the valid ones (a usage error).
pub fn parse_failure_name(name: &str) -> Result<FailureReason, String> {
    let name = name.trim();
    FailureReason::ALL
        .into_iter()
        .find(|reason| {
            reason.analytics_name().eq_ignore_ascii_case(name)
                || reason.as_str().eq_ignore_ascii_case(name)
        })
        .ok_or_else(|| {
            let names: Vec<&str> = FailureReason::ALL
                .into_iter()
                .map(FailureReason::as_str)
                .collect();
            format!(
                "unknown failure name; valid names (with or without the ToDeviceFailedToDecrypt_ \
                 prefix): {}",
                names.join(", ")
            )
        })
}

/// Prints one reason's documentation, or the list of names.
pub fn run(name: Option<FailureReason>) -> CliResult {
    let text = match name {
        Some(reason) => explanation(reason),
        None => FailureReason::ALL
            .into_iter()
            .map(|reason| format!("{:<48} {}\n", reason.analytics_name(), reason.info().when))
            .collect(),
    };
    print!("{text}");
    Ok(())
}

fn explanation(reason: FailureReason) -> String {
    let info = reason.info();
    let recovery = if reason.needs_new_session() {
        "A new Olm session fixes it: when the sending device is known (--device-keys), `decrypt` \
         queues a /keys/claim for it (at most once per device per hour); see `requests`."
    } else {
        "A new Olm session does not fix it: no recovery is attempted."
    };
    format!(
        "{} ({})\n\nWhen: {}\n\nTypical root cause: {}\n\nWhat to look at: {}\n\nRecovery: {}\n",
        info.analytics_name,
        info.reason,
        info.when,
        info.typical_root_cause,
        info.what_to_check,
        recovery
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_short_names_parse_in_any_case() {
        for reason in FailureReason::ALL {
            assert_eq!(parse_failure_name(reason.analytics_name()), Ok(reason));
            assert_eq!(parse_failure_name(reason.as_str()), Ok(reason));
            assert_eq!(
                parse_failure_name(&reason.as_str().to_ascii_lowercase()),
                Ok(reason)
            );
        }
        let error = parse_failure_name("Wedged").unwrap_err();
        for reason in FailureReason::ALL {
            assert!(error.contains(reason.as_str()), "{error}");
        }
    }
}
