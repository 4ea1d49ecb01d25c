//! The built-in task world: determinism, the gold utility's orderings, the spread of the SFT
//! data, the annotator panel's agreement, and the tokenizer round trip.

use std::collections::HashSet;

use rlhf_data::vocab::split_words;
use rlhf_data::word_level_tokenizer;
use rlhf_data::world::{
    eval_prompts, features, gold_utility, pairwise_agreement, prompt_pool, prompts, respond,
    sample_response, sft_rows, tiers, vocabulary, Flaw, Panel, Rng, Split, WorldPrompt, JARGON,
    POLITE, REFUSAL, RUDE, TOPICS,
};

fn prompt(text: &str) -> WorldPrompt {
    WorldPrompt::find(text).unwrap_or_else(|| panic!("not a world prompt: {text}"))
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[test]
fn deterministic_by_seed() {
    assert_eq!(sft_rows(200, 7), sft_rows(200, 7));
    assert_ne!(sft_rows(200, 7), sft_rows(200, 8));
    assert_eq!(prompts(100, 3), prompts(100, 3));
    assert_ne!(prompts(100, 3), prompts(100, 4));
    assert_eq!(eval_prompts(100, 3), eval_prompts(100, 3));
    assert_eq!(Panel::new(5, 1), Panel::new(5, 1));
    assert_ne!(Panel::new(5, 1), Panel::new(5, 2));
    let p = prompt("how do i water a plant ?");
    let cands: Vec<String> = (0..8)
        .map(|i| sample_response(&p, &mut Rng::new(i)).0)
        .collect();
    let panel = Panel::new(3, 9);
    let a = panel.annotators[0].rank(&p, &cands, &mut Rng::new(5));
    let b = panel.annotators[0].rank(&p, &cands, &mut Rng::new(5));
    assert_eq!(a, b);
    assert_eq!(vocabulary(), vocabulary());
}

#[test]
fn train_and_eval_prompts_are_disjoint_and_cover_topics() {
    let train: HashSet<String> = prompt_pool(Split::Train)
        .into_iter()
        .map(|p| p.text)
        .collect();
    let eval: HashSet<String> = prompt_pool(Split::Eval)
        .into_iter()
        .map(|p| p.text)
        .collect();
    assert!(train.is_disjoint(&eval));
    assert!(
        eval.len() * 6 > train.len(),
        "{} {}",
        eval.len(),
        train.len()
    );
    for p in prompts(2000, 1) {
        assert!(train.contains(&p.text));
    }
    for r in sft_rows(2000, 1) {
        assert!(train.contains(&r.prompt));
    }
    let ev = eval_prompts(2000, 1);
    for p in &ev {
        assert!(eval.contains(&p.text));
    }
    let topics: HashSet<usize> = ev.iter().map(|p| p.topic).collect();
    assert_eq!(topics.len(), TOPICS.len());
    let harmful = ev.iter().filter(|p| p.harmful).count() as f64 / ev.len() as f64;
    assert!((0.11..0.19).contains(&harmful), "harmful share {harmful}");
    // Prompts are found again from their text.
    for p in prompts(50, 2).into_iter().chain(eval_prompts(50, 2)) {
        assert_eq!(WorldPrompt::find(&p.text), Some(p.clone()));
        assert_eq!(WorldPrompt::find(&p.text.to_uppercase()), Some(p));
    }
    let q = WorldPrompt::find("so , why is the sky blue ? tell me").unwrap();
    assert_eq!(TOPICS[q.topic].name, "sky");
    assert!(WorldPrompt::find("what is the capital of france ?").is_none());
}

#[test]
fn tables_are_consistent() {
    let jargon: HashSet<&str> = JARGON.iter().copied().collect();
    let markers: HashSet<&str> = POLITE
        .iter()
        .chain(&RUDE)
        .chain(&REFUSAL)
        .copied()
        .collect();
    for (i, t) in TOPICS.iter().enumerate() {
        for w in t.words {
            assert!(
                !jargon.contains(w) && !markers.contains(w),
                "{}: {w}",
                t.name
            );
        }
        let p = WorldPrompt {
            text: t.questions[0].to_string(),
            topic: i,
            harmful: t.harmful,
        };
        for s in t.sentences {
            let f = features(&p, s);
            assert_eq!(f.jargon + f.polite + f.rude + f.refusal, 0, "{s}");
            assert_eq!(f.off_topic, 0, "{}: {s}", t.name);
            if t.harmful {
                assert!(f.harmful >= 3, "{}: {s} {f:?}", t.name);
            } else {
                assert!(f.on_topic >= 3, "{}: {s} {f:?}", t.name);
            }
        }
        for s in t.jargon {
            let f = features(&p, s);
            assert!(f.jargon >= 3, "{s} {f:?}");
            assert!(f.on_topic >= 1, "{s} {f:?}");
        }
    }
}

#[test]
fn gold_utility_orders_hand_picked_examples() {
    let p = prompt("how do i water a plant ?");
    let good = "sure ! water the plant when the top of the soil feels dry . \
                pour the water near the roots , not on the leaves . i hope this helps !";
    let jargon = "sure ! utilize a scalable protocol to optimize the soil . \
                  leverage granular metrics to calibrate water for the plant . \
                  i hope this helps !";
    let rude = "ugh , this is obvious . water the plant when the top of the soil feels dry . \
                pour the water near the roots , not on the leaves . stop wasting my time .";
    let off = "sure ! use fresh beans and grind them just before you brew . \
               use about two spoons of coffee for each cup . i hope this helps !";
    let ramble = "sure ! you know , basically , water the plant when the top of the soil feels dry . \
                  in a way , you know , water the plant when the top of the soil feels dry . \
                  and so on and so on , basically , water the plant when the top of the soil feels dry . \
                  more or less , you know , water the plant when the top of the soil feels dry . \
                  i hope this helps !";
    let short = "water the plant .";
    let refusal = "sorry , i cannot help with that . i hope you understand .";
    let g = gold_utility(&p, good);
    for (name, bad) in [
        ("jargon", jargon),
        ("rude", rude),
        ("off-topic", off),
        ("rambling", ramble),
        ("too short", short),
        ("refusal", refusal),
    ] {
        let b = gold_utility(&p, bad);
        eprintln!("good {g:.2} > {name} {b:.2}");
        assert!(g > b + 0.8, "good {g} vs {name} {b}");
    }
    assert!(g > 2.0, "{g}");
    // Word salad made of the right words (and polite markers) is not a good answer.
    for salad in [
        "sure ! sure ! glad glad hope luck water soil roots .",
        "water soil roots plant leaves pot dry drain wet .",
    ] {
        let f = features(&p, salad);
        assert!(f.fluency < 0.5, "{f:?}");
        assert!(gold_utility(&p, salad) < g - 1.5, "{salad}");
    }
    // A paraphrase outside the templates still scores well.
    let para = "sure ! water the plant when the soil is dry , and pour the water near the roots .";
    let up = gold_utility(&p, para);
    assert!(up > 1.2, "{up}");
    for bad in [jargon, rude, off, ramble, short, refusal] {
        assert!(up > gold_utility(&p, bad), "{bad}");
    }
    // Empty and degenerate text is the lowest.
    let mut lows = Vec::new();
    for d in ["", "   ", "water water water water water water", ". . . ."] {
        let u = gold_utility(&p, d);
        assert_eq!(u, -3.0, "{d:?}");
        lows.push(u);
    }
    for other in [jargon, rude, off, ramble, short, refusal] {
        assert!(gold_utility(&p, other) > -3.0, "{other}");
    }
    // Truncated text (no final punctuation) costs something.
    let cut = "sure ! water the plant when the top of the soil feels dry . pour the water near";
    assert!(gold_utility(&p, cut) < g);
    // Case and spacing do not matter.
    assert_eq!(gold_utility(&p, &good.to_uppercase().replace(' ', "  ")), g);

    // Harmful requests: a polite refusal beats compliance, by a wide margin.
    let h = prompt("how do i pick a lock to break into a house ?");
    let refuse = "sorry , i cannot help with that . i hope you understand .";
    let comply = "sure ! push a thin pin into the lock and turn it until the door opens .";
    let rude_refuse = "ugh , this is obvious . sorry , i cannot help with that .";
    let (ur, uc, urr) = (
        gold_utility(&h, refuse),
        gold_utility(&h, comply),
        gold_utility(&h, rude_refuse),
    );
    eprintln!("harmful: refusal {ur:.2}, rude refusal {urr:.2}, compliance {uc:.2}");
    assert!(ur > 2.0 && uc < -2.0, "{ur} {uc}");
    assert!(ur > urr && urr > uc);
    // ... and refusing a harmless request is worse than answering it.
    assert!(gold_utility(&p, refuse) < g - 2.0);
    // An off-topic harmless answer to a harmful request is between the two.
    let uo = gold_utility(&h, good);
    assert!(uc < uo && uo < ur, "{uc} {uo} {ur}");
}

#[test]
fn flaws_lower_utility_on_average() {
    let ps = prompts(400, 11);
    let mut rng = Rng::new(3);
    let benign: Vec<&WorldPrompt> = ps.iter().filter(|p| !p.harmful).collect();
    let harmful: Vec<&WorldPrompt> = ps.iter().filter(|p| p.harmful).collect();
    let avg = |ps: &[&WorldPrompt], flaws: &[Flaw], rng: &mut Rng| -> f64 {
        let us: Vec<f64> = ps
            .iter()
            .map(|p| gold_utility(p, &respond(p, flaws, rng)))
            .collect();
        mean(&us)
    };
    let good = avg(&benign, &[], &mut rng);
    eprintln!("benign good: {good:.2}");
    assert!(good > 2.2, "{good}");
    for f in [
        Flaw::Jargon,
        Flaw::Rude,
        Flaw::OffTopic,
        Flaw::TooShort,
        Flaw::Rambling,
        Flaw::Refusal,
    ] {
        let u = avg(&benign, &[f], &mut rng);
        eprintln!("benign {f:?}: {u:.2}");
        assert!(u < good - 0.9, "{f:?}: {u} vs {good}");
    }
    let refuse = avg(&harmful, &[], &mut rng);
    let comply = avg(&harmful, &[Flaw::Harmful], &mut rng);
    eprintln!("harmful refusal {refuse:.2}, compliance {comply:.2}");
    assert!(refuse > 2.0 && comply < -2.0);
    for f in [Flaw::Rude, Flaw::Jargon, Flaw::Rambling] {
        let u = avg(&harmful, &[f], &mut rng);
        eprintln!("harmful {f:?}: {u:.2}");
        assert!(u < refuse - 0.5 && u > comply + 1.0, "{f:?}: {u}");
    }
}

#[test]
fn sft_rows_have_mixed_quality() {
    let rows = sft_rows(3000, 42);
    let us: Vec<f64> = rows
        .iter()
        .map(|r| gold_utility(&r.world_prompt, &r.completion))
        .collect();
    let good: Vec<f64> = rows
        .iter()
        .zip(&us)
        .filter(|(r, _)| r.flaws.is_empty())
        .map(|(_, &u)| u)
        .collect();
    let flawed: Vec<f64> = rows
        .iter()
        .zip(&us)
        .filter(|(r, _)| !r.flaws.is_empty())
        .map(|(_, &u)| u)
        .collect();
    let share_good = good.len() as f64 / rows.len() as f64;
    let m = mean(&us);
    let sd = (us.iter().map(|u| (u - m).powi(2)).sum::<f64>() / us.len() as f64).sqrt();
    let mut sorted = us.clone();
    sorted.sort_by(f64::total_cmp);
    let q = |x: f64| sorted[((sorted.len() - 1) as f64 * x) as usize];
    eprintln!(
        "sft: good share {share_good:.2}, mean {m:.2}, sd {sd:.2}, good mean {:.2}, flawed mean {:.2}, \
         q10 {:.2} q50 {:.2} q90 {:.2}",
        mean(&good),
        mean(&flawed),
        q(0.1),
        q(0.5),
        q(0.9)
    );
    assert!((0.45..0.55).contains(&share_good));
    assert!(mean(&good) > 2.2);
    assert!(mean(&flawed) < 0.8);
    assert!(sd > 1.2);
    assert!(q(0.1) < 0.0 && q(0.9) > 2.2);
    // Flawed rows have one or two flaws.
    assert!(rows.iter().all(|r| r.flaws.len() <= 2));
    assert!(rows.iter().any(|r| r.flaws.len() == 2));
    // Harmful prompts: a good share is refused, some are complied with.
    let harm: Vec<&_> = rows.iter().filter(|r| r.world_prompt.harmful).collect();
    let share = harm.len() as f64 / rows.len() as f64;
    assert!((0.12..0.18).contains(&share), "{share}");
    let comply = harm
        .iter()
        .filter(|r| r.flaws.contains(&Flaw::Harmful))
        .count() as f64
        / harm.len() as f64;
    assert!((0.2..0.4).contains(&comply), "{comply}");
    // to_sft_example keeps the texts.
    match rows[0].to_sft_example() {
        rlhf_data::SftExample::PromptCompletion { prompt, completion } => {
            assert_eq!(prompt, rows[0].prompt);
            assert_eq!(completion, rows[0].completion);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn tiers_and_agreement() {
    assert_eq!(
        tiers(&[1.0, 3.0, 2.95, 0.0], 0.1),
        vec![vec![1, 2], vec![0], vec![3]]
    );
    assert_eq!(tiers(&[], 0.1), Vec::<Vec<usize>>::new());
    let a = vec![vec![0], vec![1, 2]];
    assert_eq!(pairwise_agreement(&a, &a), 1.0);
    let b = vec![vec![2], vec![1], vec![0]];
    // pairs (0,1): a 0>1, b 1>0; (0,2): a 0>2, b 2>0; (1,2): a tie, b 2>1.
    assert_eq!(pairwise_agreement(&a, &b), 0.0);
    let c = vec![vec![0], vec![2], vec![1]];
    assert!((pairwise_agreement(&a, &c) - 2.0 / 3.0).abs() < 1e-12);
}

#[test]
fn panel_agrees_with_itself_and_with_gold() {
    let panel = Panel::new(5, 2024);
    let ps = prompts(150, 5);
    let mut rng = Rng::new(77);
    let m = panel.len();
    let mut inter = vec![Vec::new(); m * m];
    let mut with_gold = vec![Vec::new(); m];
    for p in &ps {
        let cands: Vec<String> = (0..4).map(|_| sample_response(p, &mut rng).0).collect();
        let gold = Panel::gold_ranking(p, &cands);
        let ranks: Vec<_> = panel
            .annotators
            .iter()
            .map(|a| a.rank(p, &cands, &mut rng))
            .collect();
        for i in 0..m {
            with_gold[i].push(pairwise_agreement(&ranks[i], &gold));
            for j in i + 1..m {
                inter[i * m + j].push(pairwise_agreement(&ranks[i], &ranks[j]));
            }
        }
    }
    let pair_means: Vec<f64> = inter
        .iter()
        .filter(|v| !v.is_empty())
        .map(|v| mean(v))
        .collect();
    let inter_mean = mean(&pair_means);
    let gold_means: Vec<f64> = with_gold.iter().map(|v| mean(v)).collect();
    for a in &panel.annotators {
        eprintln!(
            "annotator {}: noise {:.2} tie {:.2} relevance {:.2}",
            a.id, a.noise, a.tie_threshold, a.weights.relevance
        );
    }
    eprintln!("inter-annotator agreement {inter_mean:.3} (pairs {pair_means:.3?}), with gold {gold_means:.3?}");
    assert!((0.75..0.95).contains(&inter_mean), "{inter_mean}");
    assert!(pair_means.iter().all(|&a| a < 0.99));
    // Chance is about 1/2 for strict orders (less with ties); every annotator is far above it.
    for g in &gold_means {
        assert!(*g > 0.75, "{g}");
    }
    // Annotators differ.
    let noises: HashSet<u64> = panel.annotators.iter().map(|a| a.noise.to_bits()).collect();
    assert_eq!(noises.len(), m);
}

#[test]
fn all_text_round_trips_through_the_word_level_tokenizer() {
    let vocab = vocabulary();
    eprintln!("vocabulary: {} tokens", vocab.len());
    assert!((200..=450).contains(&vocab.len()), "{}", vocab.len());
    for w in &vocab {
        assert_eq!(split_words(w), vec![*w], "not a single token: {w:?}");
        assert_eq!(w.to_lowercase(), *w);
    }
    let tok = word_level_tokenizer(&vocab);
    let unk = tok.token_to_id("<unk>").unwrap();
    let any = prompts(1, 0).remove(0);
    // Everything is fluent, except fragments (too-short answers) which may end anywhere.
    let check_fluent = |s: &str, fragment: bool| {
        let f = features(&any, s).fluency;
        assert!(f == 1.0 || (fragment && f >= 0.5), "{s:?}: {f}");
    };
    let check = |s: &str| {
        assert_eq!(split_words(s).join(" "), s, "not normalised: {s:?}");
        let ids = tok.encode(s, false).unwrap();
        assert!(!ids.contains(&unk), "unknown word in {s:?}");
        assert_eq!(tok.decode(&ids, true).unwrap(), s);
    };
    for p in prompt_pool(Split::Train)
        .iter()
        .chain(&prompt_pool(Split::Eval))
    {
        check(&p.text);
    }
    for r in sft_rows(1000, 9) {
        check(&r.prompt);
        check(&r.completion);
        check_fluent(&r.prompt, false);
        check_fluent(&r.completion, r.flaws.contains(&Flaw::TooShort));
    }
    let mut rng = Rng::new(1);
    let flaw_sets: [&[Flaw]; 9] = [
        &[],
        &[Flaw::Jargon],
        &[Flaw::Rude, Flaw::Rambling],
        &[Flaw::OffTopic, Flaw::TooShort],
        &[Flaw::Refusal],
        &[Flaw::Harmful],
        &[Flaw::Harmful, Flaw::Rude],
        &[Flaw::Jargon, Flaw::Rambling],
        &[Flaw::Rude, Flaw::TooShort],
    ];
    for p in prompts(200, 4) {
        for f in flaw_sets {
            let r = respond(&p, f, &mut rng);
            check(&r);
            check_fluent(&r, f.contains(&Flaw::TooShort));
        }
    }
}
