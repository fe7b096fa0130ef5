pub fn run(_root: &std::path::Path, _quick: bool) -> anyhow::Result<()> {
    anyhow::bail!("bench is not written yet")
}
