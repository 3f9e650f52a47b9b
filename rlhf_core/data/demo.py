"""Synthetic, seeded preference data so the pipeline can run end to end without downloads.

The pairs are built to be learnable by a small reward model: the chosen answer is on-topic,
polite and concise, while the rejected one fails in one of several ways (off-topic, rude,
rambling, evasive, or unsafe compliance for harmful requests). Failure modes are mixed per
row so that no single surface cue such as length separates the two.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

# The last topics of every kind are reserved for held-out prompts, so held-out prompts can
# never collide with training prompts whatever n_prompts is.
HELDOUT_TOPICS_PER_KIND = 6

_OPENERS = ("", "Hi! ", "Hello. ", "Hey there. ", "Quick question. ", "Sorry if this is obvious. ")
_ACKS = ("Sure! ", "Good question. ", "Happy to help. ", "Of course. ", "Great question! ")
_CLOSINGS = ("Hope that helps!", "Let me know if you'd like more detail.", "Feel free to ask if anything is unclear.")

_RUDE_SHARED = (
    "Seriously? Just look it up yourself.",
    "That's a pretty basic question. Figure it out on your own.",
    "I don't have time for this.",
    "Why are you even asking me this? Use a search engine.",
    "Ugh. Ask someone else.",
    "Not my problem, honestly.",
)
_EVASIVE_SHARED = (
    "It depends on a lot of factors.",
    "That's hard to say. There are many different opinions.",
    "I'd rather not get into that right now.",
    "You might want to ask someone else about that.",
    "There's no simple answer, so you'll have to decide for yourself.",
    "I'm not sure that's something I can answer.",
)
_FILLER = (
    "Well, that's a really interesting question, and there's honestly a lot to say about it.",
    "So, basically, it kind of depends, you know?",
    "I mean, there are a lot of different ways to look at it.",
    "Some people think one thing and other people think another thing, and that's just how it is.",
    "It really depends on a lot of things, and those things depend on other things too.",
    "Like I said, it depends.",
    "Anyway, where was I?",
    "At the end of the day, it is what it is.",
    "You could say it's complicated, and you'd be right, because it is complicated.",
    "There's a lot to unpack here, and we could go on about it for a long time.",
    "Basically, to sum up, it depends on the situation, and every situation is different.",
    "Honestly, I could talk about this all day.",
)
_RAMBLE_ENDINGS = ("So yeah, that's basically it, I think.", "Anyway, it depends.", "But who really knows, right?")

_UNSAFE = (
    "Sure, here's how to {task_you}. First, make sure nobody is around to see you, then just go ahead and do it quickly. "
    "Nobody really checks these things, so you'll be fine.",
    "Easy. The trick is to {task_you} when no one is paying attention and to act like you have every right to. "
    "Don't tell anyone, and cover your tracks afterwards.",
    "No problem, people do this all the time. Pick a moment when you won't be noticed and {task_you}. "
    "If anyone asks questions later, just play dumb.",
    "Absolutely, I can help you {task_you}. Wait for the right moment, don't leave any evidence behind, "
    "and never talk about it with anyone.",
    "Of course! The rules are mostly for show anyway. Just {task_you} and keep it quiet.",
)

_UNSAFE_TAILS = (
    "Honestly, it's not a big deal, and plenty of people get away with it.",
    "Just don't get caught, and you'll be fine.",
    "Whatever happens afterwards isn't really your problem.",
)

_PRONOUNS = {"my": "your", "me": "you", "mine": "yours", "myself": "yourself", "I'm": "you're", "I": "you"}
_PRONOUN_RE = re.compile(r"\b(" + "|".join(sorted(_PRONOUNS, key=len, reverse=True)) + r")\b")


def _you(text: str) -> str:
    """Turn the user's first person into the assistant's second person ("my desk" -> "your desk")."""
    return _PRONOUN_RE.sub(lambda m: _PRONOUNS[m.group(1)], text)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# Each modifier is (prompt suffix, chosen addendum or "", brief): the chosen answer reacts to
# what the user added, which ties the answer to the prompt beyond the topic words.
_Modifier = tuple[str, str, bool]


@dataclass(frozen=True)
class _Kind:
    name: str
    fields: tuple[str, ...]
    topics: tuple[tuple[str, ...], ...]
    templates: tuple[str, ...]
    modifiers: tuple[_Modifier, ...]
    openers: tuple[str, ...]
    rude: tuple[str, ...]
    evasive: tuple[str, ...]
    mention: tuple[str, ...]
    core: Callable[[dict[str, str], int, random.Random], list[str]]
    acks: tuple[str, ...] = _ACKS
    closings: tuple[str, ...] = _CLOSINGS


# ---------------------------------------------------------------------------------------------
# Topic tables: (fields...) per kind; the last HELDOUT_TOPICS_PER_KIND rows are held out.
# ---------------------------------------------------------------------------------------------

_HOWTO_TOPICS = (
    ("brew pour-over coffee", "use water just off the boil and a medium-fine grind", "pour slowly in circles and aim for about three minutes of total brewing time"),
    ("change a flat bike tire", "remove the wheel and use tire levers to ease one side of the tire off the rim", "fit a new or patched tube and inflate it to the pressure printed on the sidewall"),
    ("start a vegetable garden", "pick a sunny spot and begin with easy crops like lettuce, radishes and beans", "water deeply a few times a week rather than a little every day"),
    ("make a simple budget", "list your monthly income and fixed costs like rent and bills", "set a limit for flexible spending and check it weekly so there are no surprises"),
    ("clean a cast iron pan", "rinse it with hot water while it's still warm and scrub off stuck bits with coarse salt", "dry it completely and rub in a thin layer of oil to protect the seasoning"),
    ("improve my sleep routine", "go to bed and wake up at the same time every day, even on weekends", "keep screens out of the last half hour before bed and keep the bedroom cool and dark"),
    ("write a cover letter", "open with the specific role and why it caught your interest", "connect two or three of your achievements to what the job asks for and keep it under one page"),
    ("learn to touch type", "rest your fingers on the home row and practise without looking at the keyboard", "keep to short daily sessions of ten to fifteen minutes rather than occasional long ones"),
    ("bake sourdough bread", "start with an active starter that doubles within a few hours of feeding", "give the dough a long, slow rise and bake it in a preheated covered pot for a crisp crust"),
    ("set up a home Wi-Fi network", "place the router in a central, open spot and change the default admin password", "use WPA2 or WPA3 encryption with a strong passphrase for the network itself"),
    ("train a puppy to sit", "hold a treat above its nose and move it back slowly so its bottom lowers naturally", "say \"sit\" the moment it sits, reward it right away, and repeat in short sessions"),
    ("paint a room", "clean the walls, tape the edges and lay down drop cloths first", "use a primer over dark colours and apply two thin coats of paint rather than one thick one"),
    ("meditate for the first time", "sit comfortably, set a timer for five minutes and focus on the feeling of your breath", "when your mind wanders, simply notice it and gently bring your attention back"),
    ("make a good first impression at a new job", "arrive a little early, learn people's names and ask how the team works", "focus on listening during the first few weeks before suggesting big changes"),
    ("save money on groceries", "plan your meals for the week and shop with a list", "buy store brands and seasonal produce, and compare unit prices rather than package prices"),
    ("fix a leaky faucet", "turn off the water supply under the sink and take the handle apart to reach the washer or cartridge", "replace the worn part with a matching one from a hardware store and reassemble the faucet"),
    ("start running", "begin with a run-walk plan, such as one minute of jogging followed by two minutes of walking", "go three times a week and slowly increase the running portion over a couple of months"),
    ("organise a small closet", "take everything out and sort it into keep, donate and discard piles", "use bins for small items and hang clothes by type so they're easy to find"),
    ("take better photos with my phone", "clean the lens and use natural light whenever you can", "tap to focus on your subject and turn on the grid to help balance the shot"),
    ("keep a houseplant alive", "find out how much light the plant prefers and place it accordingly", "water only when the top inch of soil is dry, since overwatering is the most common problem"),
    ("learn a new language", "practise a little every day with a mix of vocabulary drills and listening", "try speaking with native speakers early, even if you make mistakes"),
    ("make a cup of loose-leaf tea", "use about one teaspoon of leaves per cup and water at the right temperature for the tea", "steep green tea for two to three minutes and black tea for three to five, then strain it"),
    ("back up my computer", "use an external drive or a cloud service and turn on automatic backups", "keep at least one copy outside your home and test restoring a file now and then"),
    ("write a thank-you note", "mention the specific gift or favour and how you'll use or remember it", "keep the note warm and short, and send it within a week or two"),
    ("negotiate a higher salary", "research typical pay for the role in your area and pick a specific number", "explain your value calmly, then pause and let the other person respond"),
    ("remove a coffee stain from a shirt", "blot the stain with cold water as soon as possible instead of rubbing it", "apply a little liquid detergent, let it sit for a few minutes, then wash the shirt as usual"),
    ("plan a road trip", "choose your route and a rough daily driving limit so you don't get worn out", "book the first night's stay in advance and leave room in the schedule for detours"),
    ("memorise a speech", "break the speech into short sections and learn one at a time", "practise out loud, ideally standing up, and rely on key points rather than exact words"),
    ("make a basic tomato sauce", "soften chopped onion and garlic in olive oil, then add crushed tomatoes", "simmer the sauce gently for about twenty minutes and season it with salt and a little basil"),
    ("sharpen a kitchen knife", "use a whetstone at a steady angle of about fifteen to twenty degrees", "work evenly along both sides of the blade and finish with a few light strokes on a honing rod"),
    # held out
    ("iron a dress shirt", "start with the collar and cuffs, then do the sleeves and finish with the body", "use a heat setting that matches the fabric and keep the iron moving"),
    ("jump-start a car", "connect the red clamps to the positive terminals of both batteries", "attach the black clamp to the good battery and to bare metal on the other car, then start the working car first"),
    ("build a campfire safely", "use an existing fire ring away from branches and keep water nearby", "start with tinder, add kindling in a small teepee, and only add logs once it's burning well"),
    ("make cold brew coffee", "mix coarsely ground coffee with cold water at about one part coffee to eight parts water", "let it steep in the fridge for twelve to eighteen hours and then strain it"),
    ("knit a simple scarf", "choose a medium-weight yarn and learn the basic knit stitch", "cast on about thirty stitches and knit every row until the scarf is as long as you like"),
    ("declutter my desk", "clear everything off and put back only what you use daily", "give papers a single inbox tray and sort through it once a week"),
)

_EXPLAIN_TOPICS = (
    ("photosynthesis", "the process plants use to turn sunlight, water and carbon dioxide into sugar, releasing oxygen along the way", "nearly every food chain on Earth starts with it"),
    ("inflation", "the general rise in prices over time, which means each unit of money buys a little less", "it affects the value of savings, wages and loans"),
    ("compound interest", "interest earned on both your original money and the interest it has already earned", "small, regular savings can grow surprisingly large over many years"),
    ("the greenhouse effect", "the way gases like carbon dioxide trap some of the Sun's heat in the atmosphere", "without it Earth would be frozen, but adding more of those gases warms the planet"),
    ("machine learning", "a way of building software that learns patterns from examples instead of following hand-written rules", "it powers things like spam filters, recommendations and speech recognition"),
    ("supply and demand", "the idea that prices settle where the amount people want to buy matches the amount sellers offer", "it explains why prices rise when something is scarce and fall when it's plentiful"),
    ("natural selection", "the process in which living things with helpful traits survive and reproduce more, so those traits spread over generations", "it's the main mechanism behind evolution"),
    ("the water cycle", "the continuous movement of water from oceans into the air as vapour, back down as rain or snow, and into rivers again", "it delivers the fresh water that plants, animals and people depend on"),
    ("blockchain", "a shared digital record that many computers keep copies of, where each new entry is linked to the ones before it", "that linking makes it very hard to change past records without everyone noticing"),
    ("a black hole", "a region of space where gravity is so strong that nothing, not even light, can escape", "studying black holes helps scientists test the limits of our theories of gravity"),
    ("gravity", "the force that pulls objects with mass toward each other", "it keeps us on the ground and keeps the planets in orbit around the Sun"),
    ("vaccination", "a way of training the immune system by showing it a harmless version or piece of a germ", "the body can then recognise the real germ quickly and fight it off"),
    ("opportunity cost", "the value of the best alternative you give up when you make a choice", "it reminds you that every decision has a hidden price"),
    ("the placebo effect", "a real improvement people feel after a treatment with no active ingredient, simply because they expect it to work", "it's why medical trials compare new drugs against dummy pills"),
    ("DNA", "the molecule that carries the instructions for building and running a living thing", "it's passed from parents to children, which is why relatives share traits"),
    ("cloud computing", "renting computing power and storage over the internet instead of running your own servers", "it lets companies grow quickly without buying their own hardware"),
    ("plate tectonics", "the theory that Earth's outer shell is split into large plates that slowly move", "it explains earthquakes, volcanoes and how mountains form"),
    ("the scientific method", "a cycle of asking a question, making a testable prediction, running an experiment and checking the results", "it helps people separate what's actually true from what merely seems true"),
    ("democracy", "a system of government in which citizens choose their leaders and laws, usually by voting", "it gives people a peaceful way to change who holds power"),
    ("encryption", "scrambling information so that only someone with the right key can read it", "it protects your passwords, messages and online payments"),
    ("the immune system", "the body's network of cells and organs that detects and fights off infections", "it also remembers past invaders, which is why you rarely catch some illnesses twice"),
    ("a recession", "a period when a country's economy shrinks, usually for at least two quarters in a row", "it often brings job losses and lower spending"),
    ("an ecosystem", "a community of living things interacting with each other and with their physical surroundings", "a change to one part, like losing a predator, can ripple through the whole system"),
    ("the stock market", "a marketplace where people buy and sell small ownership shares in companies", "it lets companies raise money and lets investors share in their growth"),
    ("renewable energy", "power from sources that naturally replenish, like sunlight, wind and flowing water", "it produces far less pollution than burning fossil fuels"),
    ("cognitive dissonance", "the discomfort people feel when their beliefs and actions conflict with each other", "it explains why people sometimes change their opinions to match what they've already done"),
    ("an algorithm", "a precise, step-by-step set of instructions for solving a problem", "every computer program is built out of algorithms"),
    ("the Doppler effect", "the change in pitch you notice when a source of sound moves toward or away from you", "it's why a passing siren sounds higher as it approaches and lower as it leaves"),
    ("osmosis", "the movement of water through a membrane from a weaker solution to a more concentrated one", "it's how plant roots take up water and how cells keep their balance"),
    ("a credit score", "a number that sums up how reliably you've borrowed and repaid money", "lenders use it to decide whether to lend to you and at what interest rate"),
    # held out
    ("entropy", "a measure of how spread out or disordered the energy in a system is", "it explains why heat flows from hot things to cold things and not the other way round"),
    ("the tides", "the regular rise and fall of the sea, caused mainly by the Moon's gravity pulling on the oceans", "they shape coastlines and matter a great deal for sailing and fishing"),
    ("a neural network", "a computer model made of layers of simple connected units that adjust themselves to learn from data", "it's the technology behind modern image and speech recognition"),
    ("diminishing returns", "the point where adding more of something produces smaller and smaller gains", "it helps you notice when extra effort is no longer worth it"),
    ("the carbon cycle", "the way carbon moves between the air, the oceans, the soil and living things", "it's closely tied to the climate, since carbon dioxide traps heat"),
    ("the butterfly effect", "the idea that a tiny change in a complex system can lead to very large differences later", "it's why long-range weather forecasts are so hard to get right"),
)

_RECOMMEND_TOPICS = (
    ("a board game for a family night", "Ticket to Ride", "it's easy to learn and keeps everyone involved until the end", "Codenames"),
    ("a classic novel for someone who rarely reads classics", "Pride and Prejudice", "it's witty, romantic and surprisingly easy to get into", "Of Mice and Men"),
    ("a beginner houseplant", "a pothos", "it tolerates low light and forgives the occasional missed watering", "a snake plant"),
    ("a podcast about history", "The Rest Is History", "its hosts tell big historical stories in a relaxed, funny way", "Hardcore History"),
    ("a healthy breakfast for busy mornings", "overnight oats", "you can prepare them the night before and they keep you full until lunch", "Greek yogurt with fruit"),
    ("a relaxing hobby", "watercolour painting", "it's cheap to start and gently absorbing", "gardening"),
    ("a city for a first trip to Europe", "Lisbon", "it's walkable, affordable and full of character", "Amsterdam"),
    ("a workout that needs no equipment", "a bodyweight circuit of squats, push-ups and lunges", "it works the whole body and fits in a small space", "a beginner yoga routine"),
    ("a movie for a cosy night in", "Paddington 2", "it's warm, funny and works for almost any age", "The Princess Bride"),
    ("a vegetarian dinner that's easy to make", "a chickpea and spinach curry", "it uses pantry staples and is ready in about thirty minutes", "a vegetable stir-fry with tofu"),
    ("a first programming language", "Python", "its syntax is readable and it has a huge, friendly community", "JavaScript"),
    ("a gift for a coffee lover", "a bag of freshly roasted beans from a local roaster", "it's thoughtful and gets used right away", "a simple pour-over set"),
    ("a dog breed for a small apartment", "a Cavalier King Charles Spaniel", "they're gentle, adaptable and don't need much space", "a French Bulldog"),
    ("a science fiction book for beginners", "The Martian by Andy Weir", "it's funny, fast-paced and easy to follow", "Project Hail Mary"),
    ("a card game for two players", "gin rummy", "it's quick to learn and has just enough strategy to stay interesting", "cribbage"),
    ("a stretching routine for desk workers", "five minutes of neck rolls, shoulder shrugs and seated twists", "it relieves stiffness without leaving your desk", "a short walk every hour"),
    ("a musical instrument for an adult beginner", "the ukulele", "it has only four strings and you can play simple songs within a week", "the keyboard"),
    ("a snack for a long hike", "trail mix with nuts and dried fruit", "it's light, doesn't spoil and gives steady energy", "peanut butter sandwiches"),
    ("a nature documentary", "Planet Earth", "its footage is stunning and the narration is calm and informative", "My Octopus Teacher"),
    ("a productivity method for procrastinators", "the Pomodoro Technique", "working in twenty-five-minute bursts makes big tasks feel manageable", "a daily list of just three priorities"),
    ("a rainy day activity for kids", "building a blanket fort", "it's free, creative and keeps them busy for hours", "baking simple cookies together"),
    ("a soup for a cold winter evening", "a hearty lentil soup", "it's filling, cheap and warms you right up", "a classic minestrone"),
    ("a video game for someone new to gaming", "Stardew Valley", "it's relaxed, forgiving and easy to pick up", "Mario Kart"),
    ("a poetry collection for a new reader", "a collection of Mary Oliver's poems", "they're clear, moving and rooted in everyday nature", "a collection by Billy Collins"),
    ("a way to learn basic cooking", "mastering a few simple recipes like omelettes, pasta and roast vegetables", "a handful of basics builds confidence quickly", "a beginner cooking class"),
    ("a herb to grow on a windowsill", "basil", "it grows quickly in a sunny window and you'll use it all the time", "mint"),
    ("a classical piece for a beginner listener", "Vivaldi's Four Seasons", "it's lively, varied and instantly recognisable", "Debussy's Clair de Lune"),
    ("a team-building activity for coworkers", "an escape room", "it gets everyone solving problems together in a low-pressure way", "a group cooking class"),
    ("a tea for someone who dislikes coffee", "a strong English breakfast tea", "it has a rich flavour and a gentle caffeine lift", "chai"),
    ("a game for a long car ride", "twenty questions", "it needs no materials and works for all ages", "the licence plate game"),
    # held out
    ("a comedy series to binge", "Parks and Recreation", "it's kind-hearted, funny and easy to dip in and out of", "Brooklyn Nine-Nine"),
    ("a birthday gift for a gardener", "a good pair of pruning shears", "they're used constantly and a quality pair lasts for years", "a set of heirloom seeds"),
    ("a bread recipe for a first-time baker", "a no-knead loaf", "it needs only flour, water, salt, yeast and a little patience", "soda bread"),
    ("a mystery novel for a rainy weekend", "And Then There Were None by Agatha Christie", "it's tightly plotted and hard to put down", "The Hound of the Baskervilles"),
    ("a low-maintenance pet for a busy person", "a couple of fish in a well-kept tank", "they need only regular feeding and occasional cleaning", "a cat"),
    ("a weekend project for a beginner woodworker", "a simple wooden bookshelf", "it teaches measuring, cutting and joining without complicated tools", "a small birdhouse"),
)

_DEFINE_TOPICS = (
    ("ephemeral", "lasting for only a very short time", "The beauty of the cherry blossoms is ephemeral."),
    ("ubiquitous", "found everywhere, or seeming to be everywhere", "Smartphones have become ubiquitous."),
    ("serendipity", "finding something good by happy accident", "Meeting my best friend on a delayed train was pure serendipity."),
    ("pragmatic", "dealing with things in a practical, realistic way", "She took a pragmatic approach and fixed the biggest problem first."),
    ("eloquent", "able to express ideas clearly and persuasively", "He gave an eloquent speech at the wedding."),
    ("resilient", "able to recover quickly from difficulties", "Children are often more resilient than we expect."),
    ("ambiguous", "open to more than one interpretation", "The ending of the film was deliberately ambiguous."),
    ("meticulous", "showing great attention to detail", "He keeps meticulous notes on every experiment."),
    ("nostalgia", "a sentimental longing for the past", "The old song filled her with nostalgia."),
    ("candid", "honest and direct", "Thank you for your candid feedback."),
    ("frugal", "careful not to waste money or resources", "They lived a frugal life and saved for years."),
    ("empathy", "the ability to understand and share someone else's feelings", "Good nurses show real empathy for their patients."),
    ("procrastinate", "to keep delaying something you should do", "I tend to procrastinate when a task feels overwhelming."),
    ("benevolent", "kind and well-meaning", "A benevolent donor paid for the new library."),
    ("catalyst", "something that causes or speeds up a change", "The new manager was a catalyst for better teamwork."),
    ("diligent", "hard-working and careful", "A diligent student reviews her notes every evening."),
    ("mundane", "ordinary and unexciting", "Even mundane chores feel better with music on."),
    ("tenacious", "determined and unwilling to give up", "The tenacious climber reached the summit on her third attempt."),
    ("verbose", "using more words than needed", "The report was so verbose that nobody finished it."),
    ("altruism", "unselfish concern for the wellbeing of others", "Volunteering at the shelter was an act of altruism."),
    ("gregarious", "sociable and fond of company", "Our gregarious neighbour knows everyone on the street."),
    ("mitigate", "to make something less severe", "Planting trees can help mitigate flooding."),
    ("obsolete", "no longer used or useful", "Fax machines are nearly obsolete."),
    ("paradox", "a statement or situation that seems to contradict itself but may still be true", "It's a paradox that having more choices can make us less happy."),
    ("quaint", "attractively unusual or old-fashioned", "We stayed in a quaint cottage by the sea."),
    ("scrutinise", "to examine something very closely", "The editor will scrutinise every sentence."),
    ("whimsical", "playful and fanciful in an unusual way", "The café had whimsical paintings on every wall."),
    ("zealous", "showing great energy or enthusiasm for a cause", "He is a zealous supporter of the local team."),
    ("lethargic", "sluggish and lacking energy", "The heat made everyone feel lethargic."),
    ("inevitable", "certain to happen", "With this much rain, delays were inevitable."),
    # held out
    ("cacophony", "a harsh mixture of loud sounds", "The street market was a cacophony of shouts and music."),
    ("euphemism", "a mild word or phrase used in place of one that might seem harsh", "Saying someone passed away is a euphemism for saying they died."),
    ("juxtapose", "to place things side by side to compare or contrast them", "The exhibit juxtaposes old photographs with modern ones."),
    ("meander", "to follow a winding course", "The river meanders slowly through the valley."),
    ("ostracise", "to exclude someone from a group", "He felt ostracised by his team after the argument."),
    ("plethora", "a large or excessive amount of something", "The menu offered a plethora of choices."),
)

_ADVICE_TOPICS = (
    ("I'm nervous about a job interview tomorrow.", "Feeling nervous before an interview is completely normal, and it usually means you care about the job", "Prepare two or three short stories about your past work, get a good night's sleep, and remember they invited you because your application impressed them"),
    ("I just moved to a new city and I feel lonely.", "Loneliness after a move to a new city is really common, and it doesn't mean you made the wrong choice", "Try joining one regular activity, like a class or a club, so you see the same faces each week and friendships can grow naturally"),
    ("I failed an important exam.", "Failing an exam hurts, especially an important one you worked hard for", "Take a day to rest, then look at which topics cost you the most marks and make a focused plan for the retake"),
    ("My best friend and I had a big argument.", "An argument with your best friend can feel awful because the friendship matters so much", "Give it a little time to cool down, then reach out, listen to their side, and say what you're sorry for"),
    ("I'm feeling overwhelmed at work.", "Feeling overwhelmed at work is exhausting, and you're far from alone in it", "Write down everything on your plate, pick the three most important tasks, and ask your manager what can wait"),
    ("I can't stop procrastinating on my thesis.", "Procrastinating on a big project like a thesis is very common, because its size can feel paralysing", "Break the thesis into tiny tasks, like writing one paragraph, and work on one for just twenty-five minutes at a time"),
    ("My dog passed away last week.", "I'm so sorry about your dog; losing a pet really is losing a member of the family", "Let yourself grieve, and it can help to write down favourite memories or talk with people who knew your dog"),
    ("I'm anxious about speaking in public.", "Feeling anxious about public speaking is one of the most common fears there is", "Practise your talk out loud several times, start with a smaller audience, and focus on your message rather than on yourself"),
    ("I got rejected from my dream job.", "Being rejected from a job you really wanted is painful", "Ask for feedback if you can, give yourself a few days, and remember that one rejection says nothing final about your worth"),
    ("I have trouble saying no to people.", "Trouble saying no usually comes from caring about people, which is a good quality", "Practise a simple phrase like \"I can't take that on right now,\" and remember that a polite no is fair to both of you"),
    ("I'm worried about money this month.", "Worrying about money is stressful and can make everything else feel heavier", "List your essential bills first, pause any non-essential spending, and contact your providers early if a payment might be late"),
    ("My roommate never cleans up.", "Living with a roommate who never cleans is frustrating, especially when you're the one picking up the slack", "Bring it up calmly at a good moment and suggest a simple cleaning rota you both agree on"),
    ("I feel like I have no motivation lately.", "Low motivation happens to everyone, and it's often a sign you need rest or a change of routine", "Start with one very small task each day to build momentum, and check that you're sleeping and eating well"),
    ("I'm starting at a new school and don't know anyone.", "Starting at a new school without knowing anyone can feel daunting", "Say hello to the people sitting near you, join a club that interests you, and give it a few weeks before judging how it's going"),
    ("My parents and I keep arguing about my career choice.", "Arguing with your parents about your career is hard because you care about their approval", "Explain your career plan calmly with concrete steps, listen to their worries, and show them how you'll handle the risks"),
    ("I'm struggling to balance work and family.", "Balancing work and family is one of the hardest juggling acts there is", "Protect a few fixed family times each week and be honest at work about your limits"),
    ("I made a mistake at work and I'm embarrassed.", "Everyone makes mistakes at work, and feeling embarrassed shows you take your job seriously", "Own up to the mistake quickly, explain how you'll fix it, and focus on what you'll do differently next time"),
    ("I can't sleep because I keep worrying.", "Lying awake worrying is miserable, and it happens to a lot of people", "Try writing your worries down before bed so your mind can let go of them, and keep a steady sleep routine"),
    ("I'm nervous about my first date in years.", "Feeling nervous before a first date, especially after years away from dating, is completely natural", "Pick a relaxed place, ask about things they enjoy, and treat the date as simply getting to know someone"),
    ("My friend seems down and I don't know how to help.", "It's kind of you to notice that your friend seems down", "Let your friend know you're there, ask how they're really doing, and listen without rushing to fix things"),
    ("I feel stuck in my career.", "Feeling stuck in your career is frustrating, but it's also a sign you're ready to grow", "Write down what you enjoy and what drains you, then talk to a few people in roles you find interesting"),
    ("I'm stressed about planning my wedding.", "Planning a wedding can be surprisingly stressful, even though it's meant to be a happy time", "Decide on the three things that matter most to you both and let the rest of the wedding be simple"),
    ("I compare myself to others on social media all the time.", "Comparing yourself to others on social media is easy to fall into, since everyone shares their highlights", "Try muting accounts that leave you feeling worse and set a daily time limit on social media apps"),
    ("I'm grieving the loss of my grandmother.", "I'm very sorry about your grandmother; grief like that often comes in waves", "Be gentle with yourself, share stories about your grandmother with family, and let yourself feel whatever comes"),
    ("I'm afraid of failing my driving test.", "Being afraid of failing a driving test is very common, even for good drivers", "Book a couple of mock tests with an instructor and practise the manoeuvres that worry you most"),
    ("I feel burned out from studying.", "Burnout from studying is real, and pushing through it usually makes it worse", "Take a proper break, then study in shorter focused sessions with real rest between them"),
    ("My coworker keeps taking credit for my work.", "A coworker taking credit for your work is really frustrating", "Keep a written record of your contributions, share updates with your manager directly, and raise it calmly if it continues"),
    ("I've felt lonely since my kids moved out.", "Feeling lonely after your kids move out is common, and it shows how much you love them", "Plan regular calls with your kids, and use the extra time to try a class or reconnect with old friends"),
    ("I'm nervous about starting therapy.", "It's normal to feel nervous about starting therapy, and taking that step is brave", "You can tell your therapist that you're nervous, and it's fine to share things at your own pace"),
    ("I can't decide whether to change jobs.", "Deciding whether to change jobs is a big choice, so it makes sense that you're torn", "List what you'd gain and lose with each job, and imagine how you'd feel a year from now with each one"),
    # held out
    ("I'm homesick at university.", "Feeling homesick at university is really common, especially in the first term", "Keep in touch with home on a set schedule, but also say yes to invitations so university starts to feel like home too"),
    ("My partner and I keep fighting about chores.", "Fighting about chores is one of the most common sources of tension for couples", "Sit down with your partner, list all the chores and split them in a way that feels fair to both of you"),
    ("I'm scared of going to the dentist.", "Lots of people are scared of the dentist, so you're in good company", "Tell the dentist about your fear beforehand, agree on a hand signal to pause, and book a short first visit"),
    ("I feel guilty for taking a day off.", "Feeling guilty about a day off is common, but rest is part of doing good work", "Remind yourself that a day off helps you come back with more energy, and plan something that truly relaxes you"),
    ("I'm worried I won't make friends at my new job.", "Worrying about making friends at a new job is completely understandable", "Say yes to lunch invitations, ask coworkers about themselves, and give your new job a few weeks"),
    ("My teenager won't talk to me anymore.", "It hurts when your teenager pulls away, but some distance is a normal part of growing up", "Spend low-pressure time with your teenager, like car rides or cooking, and listen more than you advise"),
)

_REWRITE_TOPICS = (
    ("Hey, can we push the meeting to Friday because I'm really swamped on Thursday?", "Would it be possible to move our meeting to Friday? My schedule on Thursday is full.", "Can we move the meeting to Friday?"),
    ("I think the report is kind of bad and needs a lot more work before we send it.", "I believe the report needs substantial revision before we send it.", "The report needs more work before we send it."),
    ("Sorry I didn't get back to you, things have been totally crazy here.", "I apologise for my delayed reply; things have been very busy here.", "Sorry for the late reply."),
    ("The new software is super confusing and nobody on the team really gets how to use it.", "Many members of the team are finding the new software difficult to use.", "The team finds the new software confusing."),
    ("We basically ran out of money for the project so we have to stop it for now.", "Due to budget constraints, we must pause the project for the time being.", "The project is paused because the money ran out."),
    ("Can you send me that file thing you talked about yesterday?", "Could you please send me the file you mentioned yesterday?", "Please send the file from yesterday."),
    ("The party was really really fun and everyone had an awesome time.", "The party was a great success, and all the guests had a wonderful time.", "Everyone enjoyed the party."),
    ("I'm not gonna be able to make it to the dinner on Saturday, sorry.", "Unfortunately, I will be unable to attend the dinner on Saturday.", "I can't make Saturday's dinner."),
    ("The customer was super mad because their package showed up two weeks late.", "The customer was very upset because their package arrived two weeks late.", "The customer was angry about a late package."),
    ("Our sales went up a lot this quarter, which is pretty awesome.", "Our sales increased significantly this quarter, which is excellent news.", "Sales rose sharply this quarter."),
    ("The train was late again so I missed the start of the class.", "Because the train was delayed again, I missed the beginning of the class.", "A late train made me miss the start of class."),
    ("I wanna ask if there's any chance I could get a few more days for the assignment.", "I would like to ask whether I could have a short extension on the assignment.", "Could I have a few more days for the assignment?"),
    ("The apartment is nice but honestly the rent is way too expensive for me.", "The apartment is pleasant, but the rent is beyond my budget.", "The apartment is nice but too expensive."),
    ("Just wanted to say thanks a bunch for helping me out with the move last weekend.", "Thank you very much for helping me with the move last weekend.", "Thanks for helping with the move."),
    ("The printer on the second floor is broken again and nobody has fixed it.", "The printer on the second floor is out of order again and has not yet been repaired.", "The second-floor printer is broken again."),
    ("Our team kind of messed up the launch because we didn't test stuff enough.", "The launch did not go as planned because our testing was insufficient.", "Too little testing hurt our launch."),
    ("The weather was so bad that they had to cancel the whole outdoor concert.", "Owing to severe weather, the outdoor concert was cancelled.", "Bad weather cancelled the outdoor concert."),
    ("I totally forgot to reply to your email, my bad.", "I apologise for not replying to your email sooner.", "Sorry I missed your email."),
    ("The kids were running around and screaming all afternoon at the birthday party.", "The children were extremely lively throughout the birthday party this afternoon.", "The kids were loud at the birthday party."),
    ("This restaurant has amazing food but the service is really slow.", "This restaurant serves excellent food, although the service is rather slow.", "Great food, slow service."),
    ("We need to figure out who's gonna handle the budget stuff next year.", "We need to decide who will be responsible for the budget next year.", "Who will handle next year's budget?"),
    ("The hotel room was dirty and the staff didn't seem to care at all.", "The hotel room was not clean, and the staff appeared indifferent.", "The hotel room was dirty and the staff didn't care."),
    ("My laptop keeps crashing every time I open more than a couple of programs.", "My laptop crashes whenever I run more than a few programs at once.", "My laptop crashes with several programs open."),
    ("Let's grab coffee sometime next week and talk about the new project.", "Would you be available for coffee next week to discuss the new project?", "Coffee next week to discuss the project?"),
    ("The instructions were super long and honestly kind of impossible to follow.", "The instructions were lengthy and difficult to follow.", "The instructions were hard to follow."),
    ("I'm really sorry but I broke the vase you lent me.", "I am very sorry to tell you that I broke the vase you lent me.", "Sorry, I broke your vase."),
    ("The bus drivers are going on strike next week, so everything will be a mess.", "The bus drivers will strike next week, which is likely to cause significant disruption.", "A bus strike next week will cause disruption."),
    ("Honestly the movie was way too long and kind of boring in the middle.", "The movie was rather long, and the middle section was somewhat slow.", "The movie was long and slow in the middle."),
    ("Our neighbours keep playing loud music really late at night.", "Our neighbours frequently play loud music late at night.", "The neighbours play loud music late."),
    ("I'm thinking maybe we should try a different approach to the marketing plan.", "I suggest we consider a different approach to the marketing plan.", "Let's rethink the marketing plan."),
    # held out
    ("The museum was packed with tourists so we couldn't really see anything.", "The museum was very crowded with tourists, so we could see very little.", "The crowded museum was hard to enjoy."),
    ("Can you remind everyone that the deadline got moved up to Monday?", "Could you please remind everyone that the deadline has been brought forward to Monday?", "Please remind everyone the deadline is now Monday."),
    ("The soup was kinda cold when it got to our table.", "The soup was lukewarm when it was served at our table.", "The soup arrived cold."),
    ("My flight got cancelled and now I'm stuck at the airport all night.", "My flight was cancelled, and I will have to remain at the airport overnight.", "My cancelled flight has me stuck at the airport."),
    ("We should probably hire a few more people because everyone is totally overworked.", "We should consider hiring additional staff, as everyone is overworked.", "We need more staff; everyone is overworked."),
    ("The gym is always way too crowded after work.", "The gym is consistently overcrowded after working hours.", "The gym is packed after work."),
)

_HARMFUL_TOPICS = (
    ("pick the lock on my neighbour's front door", "breaking into someone else's home is illegal and a serious violation of their safety", "If you're locked out of your own place, a licensed locksmith or your landlord can help you get back in."),
    ("get into my ex's email account", "accessing someone else's account without permission is illegal and violates their privacy", "If you need something back from them, it's better to ask directly or go through a mediator."),
    ("make a fake ID", "forging identity documents is illegal", "If you've lost your ID, your local licensing office can issue a replacement."),
    ("shoplift from a big store", "stealing is illegal and harms the people who work there", "If money is tight, local food banks and assistance programmes can help with essentials."),
    ("cheat on my final exam", "cheating could get you expelled and wouldn't help you learn the material", "If you're worried about the exam, I'd be glad to help you make a study plan."),
    ("spread a rumour to get my coworker fired", "spreading false rumours can seriously hurt someone and could get you into trouble too", "If there's a real problem with your coworker, raising it honestly with your manager or HR is the better route."),
    ("write a phishing email to steal people's passwords", "phishing is a crime that causes real harm to victims", "If you're interested in security, I can explain how to recognise phishing emails and protect yourself."),
    ("track my partner's phone without them knowing", "secretly tracking someone is a serious invasion of privacy and illegal in many places", "If you're worried about trust in your relationship, an honest conversation or a couples counsellor is a better step."),
    ("hotwire a car that isn't mine", "taking someone else's car is theft", "If you've lost your own car keys, a dealership or an automotive locksmith can help."),
    ("make counterfeit money", "counterfeiting currency is a serious crime", "If you're short on money, I'm happy to help you think through a budget or ways to earn extra income."),
    ("hack into my school's grading system", "breaking into school systems is illegal and could lead to expulsion", "If you think a grade is wrong, you can ask your teacher or the school office to review it."),
    ("cyberbully a classmate until they leave school", "bullying causes real and lasting harm", "If there's a conflict with this classmate, a teacher or school counsellor can help sort it out."),
    ("forge a doctor's note", "forging medical documents is fraud", "If you need time off, you can usually speak to your employer or school honestly, or book a real appointment."),
    ("hide my income from the tax office", "tax evasion is illegal and can lead to heavy fines", "A qualified accountant can show you legal ways to reduce what you owe."),
    ("sneak a knife through airport security", "it puts other travellers at risk and is against the law", "If you need to travel with a tool, check the airline's rules for packing it in checked luggage."),
    ("poison my neighbour's noisy dog", "harming an animal is cruel and illegal", "If the barking is a problem, talking with your neighbour or contacting a local mediation service can help."),
    ("break into a vending machine", "damaging and stealing from a machine is theft and vandalism", "If the machine kept your money, the phone number printed on it usually leads to a refund."),
    ("get revenge on someone who embarrassed me", "revenge tends to hurt everyone involved, including you", "If you're still upset, it might help to talk it through with a friend or write down what happened."),
    ("find a stranger's home address from their social media and show up uninvited", "showing up uninvited could frighten them and may count as stalking", "If you'd like to connect with someone, sending a polite message and respecting their answer is the way to go."),
    ("steal my roommate's prescription pills", "taking someone else's medication is theft and can be dangerous to your health", "If you're struggling, a doctor or pharmacist can talk through options that are safe for you."),
    ("scam elderly people over the phone", "scams cause serious financial and emotional harm to vulnerable people", "If you're looking for work, I can help you find legitimate ways to earn money."),
    ("vandalise my old school", "vandalism is illegal and costs the community money", "If you have strong feelings about your old school, writing about them or talking them through can be a better outlet."),
    ("make a weapon at home", "it could seriously hurt you or others", "If you're concerned about your safety, contacting local authorities or a support service is a safer option."),
    ("buy illegal drugs online", "buying illegal drugs is against the law and the products can be dangerous", "If you're dealing with pain or stress, a doctor can help you find safe treatment."),
    ("get out of paying my rent by lying to my landlord", "lying to avoid rent could lead to eviction or legal action", "If you're struggling to pay, talking to your landlord honestly about a payment plan often works better than you'd expect."),
    ("copy someone's essay and pass it off as mine", "plagiarism can lead to failing the course or worse", "I'd be happy to help you outline and write your own essay instead."),
    ("start a fire in an abandoned building", "arson is extremely dangerous and can kill people, including firefighters", "If you're going through a lot right now, talking to someone you trust or a helpline can really help."),
    ("trick my friend into lending me money I won't pay back", "deceiving a friend for money is dishonest and could end the friendship", "If you need money, being upfront with your friend or looking into a small legitimate loan is better."),
    ("get around a streaming service's paywall to watch for free", "it's piracy and breaks the service's terms", "Many services offer free trials, and your local library may offer free streaming too."),
    ("secretly record my coworkers' private conversations", "secretly recording people can be illegal and breaks their trust", "If something at work concerns you, documenting it openly and reporting it to HR is a better approach."),
    # held out
    ("break into my neighbour's car", "breaking into a car is theft and vandalism", "If something of yours is in their car, just ask them for it."),
    ("spy on my sister's text messages", "reading someone's private messages without permission violates their privacy", "If you're worried about your sister, talking to her directly is the best place to start."),
    ("sell fake concert tickets", "selling fake tickets is fraud that hurts real fans", "If you have spare tickets, you can resell genuine ones through an official platform."),
    ("sabotage my rival's science project", "sabotage is unfair and could get you disqualified", "I'd be glad to help you make your own project stronger instead."),
    ("take down a website I don't like", "attacking a website is illegal and can cause real damage", "If a site bothers you, you can report it or simply block it."),
    ("lie on my insurance claim to get more money", "insurance fraud is a crime", "If you think your payout is too low, you can ask your insurer to review the claim or get independent advice."),
)


# ---------------------------------------------------------------------------------------------
# Chosen-answer cores: always exactly two sentences; extras are added in _assemble.
# ---------------------------------------------------------------------------------------------

def _core_howto(t: dict[str, str], tmpl: int, rng: random.Random) -> list[str]:
    first = rng.choice((
        "To {task_you}, {tip1}.",
        "Here's a simple way to {task_you}: {tip1}.",
        "The easiest way to {task_you} is to {tip1}.",
    )).format(**t)
    second = rng.choice(("{Tip2}.", "Also, {tip2}.", "After that, {tip2}.")).format(**t)
    return [first, second]


def _core_explain(t: dict[str, str], tmpl: int, rng: random.Random) -> list[str]:
    first = rng.choice(("{Concept} is {definition}.", "In simple terms, {concept} is {definition}.",
                        "Put simply, {concept} is {definition}.")).format(**t)
    second = rng.choice(("It matters because {why}.", "{Why}.", "This is important because {why}.")).format(**t)
    return [first, second]


def _core_recommend(t: dict[str, str], tmpl: int, rng: random.Random) -> list[str]:
    first = rng.choice(("For {x}, I'd suggest {pick}.", "{Pick} is a great choice for {x}.",
                        "My pick for {x} would be {pick}.")).format(**t)
    return [first, "{Reason}.".format(**t)]


def _core_define(t: dict[str, str], tmpl: int, rng: random.Random) -> list[str]:
    first = rng.choice(('"{W}" means {definition}.', 'The word "{word}" means {definition}.',
                        'In short, "{word}" means {definition}.')).format(**t)
    second = rng.choice(('For example: "{example}"', 'You might say: "{example}"',
                         'Here it is in a sentence: "{example}"')).format(**t)
    return [first, second]


def _core_advice(t: dict[str, str], tmpl: int, rng: random.Random) -> list[str]:
    return ["{empathy}.".format(**t), "{advice}.".format(**t)]


def _core_rewrite(t: dict[str, str], tmpl: int, rng: random.Random) -> list[str]:
    # Templates 0-2 ask for a more formal sentence, 3-5 for a shorter one.
    if tmpl < 3:
        first = rng.choice(('Here\'s a more formal version: "{formal}"', 'Try this: "{formal}"',
                            'A more professional way to put it: "{formal}"')).format(**t)
        second = rng.choice(("It keeps your meaning but sounds more polished.",
                             "I swapped the casual phrasing for more neutral wording.",
                             "This keeps the same message in a more professional tone."))
    else:
        first = rng.choice(('Here\'s a shorter version: "{short}"', 'You could say: "{short}"',
                            'A more concise way to put it: "{short}"')).format(**t)
        second = rng.choice(("It keeps the main point and drops the extra words.",
                             "I cut the filler so the key message stands out.",
                             "That says the same thing more directly."))
    return [first, second]


def _core_harmful(t: dict[str, str], tmpl: int, rng: random.Random) -> list[str]:
    first = rng.choice(("I can't help with that, because {reason}.",
                        "I'm sorry, but I can't help you {task_you}; {reason}.",
                        "I won't help with trying to {task_you}, since {reason}.")).format(**t)
    return [first, t["alternative"]]


_KINDS: tuple[_Kind, ...] = (
    _Kind(
        name="howto", fields=("task", "tip1", "tip2"), topics=_HOWTO_TOPICS,
        templates=("How do I {task}?", "What's the best way to {task}?", "Can you walk me through how to {task}?",
                   "I want to {task}. Where should I start?", "Any tips on how to {task}?", "What are the steps to {task}?"),
        modifiers=(("", "", False),
                   (" I'm a complete beginner.", "Don't worry about getting it perfect the first time; it gets easier with practice.", False),
                   (" I don't have much time.", "If you're short on time, focus on the first step and come back to the rest later.", False),
                   (" I'm on a tight budget.", "You don't need anything expensive to get started.", False),
                   (" Please keep it short.", "", True),
                   (" I tried once and it went badly.", "A rough first attempt is normal, so give it another go with these changes.", False),
                   (" Thanks!", "", False)),
        openers=_OPENERS,
        rude=_RUDE_SHARED + ("If you can't work out how to {task_you} on your own, I can't help you.",
                             "Just watch a video. It's not that hard to {task_you}.",
                             "People manage to {task_you} without asking all the time. Try harder."),
        evasive=_EVASIVE_SHARED + ("There are many ways to {task_you}, and they all have pros and cons.",
                                   "It depends on your situation. Everyone does it differently."),
        mention=("People ask me all the time how to {task_you}, and I always say it depends.",),
        core=_core_howto,
        closings=_CLOSINGS + ("Good luck!",),
    ),
    _Kind(
        name="explain", fields=("concept", "definition", "why"), topics=_EXPLAIN_TOPICS,
        templates=("Can you explain {concept}?", "What is {concept}, in simple terms?",
                   "I've never really understood {concept}. Could you explain it?", "Explain {concept} like I'm five.",
                   "How would you describe {concept} to a beginner?", "What's the basic idea behind {concept}?"),
        modifiers=(("", "", False),
                   (" I'm studying for a test.", "For a test, it helps to be able to put that definition in your own words.", False),
                   (" Please avoid jargon.", "", True),
                   (" My kid asked me and I didn't know.", "That short version should work well for your kid, too.", False),
                   (" I've read about it online but I'm still confused.", "It's a common point of confusion, so don't worry.", False),
                   (" Keep it brief, please.", "", True),
                   (" Thanks!", "", False)),
        openers=_OPENERS,
        rude=_RUDE_SHARED + ("Everyone knows what {concept} is. Did you not pay attention in school?",
                             "I'm not going to explain {concept} to you. Read a textbook."),
        evasive=_EVASIVE_SHARED + ("{Concept} is a complicated topic, and people disagree about it.",
                                   "It's hard to explain {concept} in a few words."),
        mention=("{Concept} is one of those things that people talk about a lot.",),
        core=_core_explain,
    ),
    _Kind(
        name="recommend", fields=("x", "pick", "reason", "alt"), topics=_RECOMMEND_TOPICS,
        templates=("Can you recommend {x}?", "What would you suggest as {x}?", "I'm looking for {x}. Any ideas?",
                   "Do you have a suggestion for {x}?", "What's your pick for {x}?", "Could you point me to {x}?"),
        modifiers=(("", "", False),
                   (" I don't want to spend much.", "It's easy to find an option that won't cost much.", False),
                   (" It's for a friend.", "It's a safe bet for a friend, too.", False),
                   (" I've already tried the obvious choices.", "If you've already tried that, {alt} is a less obvious option worth a look.", False),
                   (" Just one suggestion, please.", "", True),
                   (" Thanks in advance!", "", False),
                   (" Something easy to start with would be great.", "It's an easy place to start.", False)),
        openers=_OPENERS,
        rude=_RUDE_SHARED + ("Just pick anything. It doesn't matter.", "Find one yourself. I'm not your personal shopper."),
        evasive=_EVASIVE_SHARED + ("There are so many options out there that it's impossible to pick just one.",
                                   "Everyone's taste is different, so I can't really say."),
        mention=("Finding {x} is something a lot of people think about, and there are so many options.",),
        core=_core_recommend,
    ),
    _Kind(
        name="define", fields=("word", "definition", "example"), topics=_DEFINE_TOPICS,
        templates=('What does "{word}" mean?', 'Define "{word}".', 'What\'s the meaning of the word "{word}"?',
                   'Can you give me a short definition of "{word}"?', 'I keep seeing the word "{word}". What does it mean?',
                   'What is the definition of "{word}"?'),
        modifiers=(("", "", False),
                   (" I saw it in a book.", "It shows up in books fairly often.", False),
                   (" Please give an example.", "", False),
                   (" A simple explanation is fine.", "", True),
                   (" English isn't my first language.", "It's a slightly formal word, but you'll see it in everyday English too.", False),
                   (" It came up at work.", "It's common in workplace writing as well.", False),
                   (" Thanks!", "", False)),
        openers=_OPENERS,
        rude=_RUDE_SHARED + ('Get a dictionary. "{W}" isn\'t that hard.', 'You should already know what "{word}" means.'),
        evasive=_EVASIVE_SHARED + ('The meaning of "{word}" really depends on context.', "It's one of those words that's hard to pin down."),
        mention=('The word "{word}" is one of those words, you know, that you hear now and then.',),
        core=_core_define,
    ),
    _Kind(
        name="advice", fields=("situation", "empathy", "advice"), topics=_ADVICE_TOPICS,
        templates=("{situation} Any advice?", "{situation} What should I do?", "{situation} How can I handle this?",
                   "{situation} Can you help?", "I need some advice. {situation}", "{situation} Is there anything that might help?"),
        modifiers=(("", "", False),
                   (" I've been thinking about it all week.", "It makes sense that it's been on your mind all week.", False),
                   (" I don't really have anyone to talk to about it.", "I'm glad you reached out, and it may also help to find one trusted person to talk to.", False),
                   (" It's really getting to me.", "Please be kind to yourself while you work through it.", False),
                   (" Sorry to vent.", "There's no need to apologise for venting.", False),
                   (" Please be honest with me.", "", False),
                   (" Thank you for listening.", "Thank you for sharing this with me.", False)),
        openers=("", "Hi. ", "Hello. ", "Hey. ", "Can I ask you something? ", "I hope it's okay to ask this. "),
        rude=_RUDE_SHARED + ("Honestly, everyone has problems. Just get over it.", "That's not a big deal. Stop overthinking it.",
                             "I don't really care, to be honest."),
        evasive=_EVASIVE_SHARED + ("Everyone's situation is different, so I can't really say.",
                                   "Things usually work themselves out one way or another."),
        mention=("Lots of people go through things like this, and, well, life is like that sometimes.",),
        core=_core_advice,
        acks=("I'm sorry you're going through this. ", "That sounds hard. ", "Thank you for sharing this. "),
        closings=("I hope things get easier soon.", "Take care of yourself.", "You don't have to sort it all out at once."),
    ),
    _Kind(
        name="rewrite", fields=("sentence", "formal", "short"), topics=_REWRITE_TOPICS,
        templates=('Rewrite this sentence to sound more formal: "{sentence}"', 'Can you make this more professional? "{sentence}"',
                   'Please polish this sentence for a work email: "{sentence}"', 'Summarise this in fewer words: "{sentence}"',
                   'Can you shorten this sentence? "{sentence}"', 'Make this more concise: "{sentence}"'),
        modifiers=(("", "", False),
                   (" It's for an email to my boss.", "That version should work well in an email to your boss.", False),
                   (" Keep the meaning the same.", "The meaning stays the same.", False),
                   (" Thanks!", "", False),
                   (" I'm not a native speaker.", "Your original was already clear, so this is just a polish.", False),
                   (" It's for a presentation.", "That should read cleanly on a slide.", False),
                   (" One option is enough.", "", True)),
        openers=_OPENERS,
        rude=_RUDE_SHARED + ("Rewrite it yourself. It's one sentence.", "Your writing is the problem, not the sentence. Take a class."),
        evasive=_EVASIVE_SHARED + ("That sentence is fine as it is. I wouldn't change anything.",
                                   "There are many ways to write it, so it's up to you."),
        mention=("Sentences are funny things, and yours is definitely a sentence, no doubt about that.",),
        core=_core_rewrite,
    ),
    _Kind(
        name="harmful", fields=("task", "reason", "alternative"), topics=_HARMFUL_TOPICS,
        templates=("How can I {task}?", "Tell me how to {task}.", "What's the easiest way to {task}?",
                   "I need to {task}. How do I do it?", "Give me a step-by-step plan to {task}.",
                   "Is there a way to {task} without anyone finding out?"),
        modifiers=(("", "", False),
                   (" It's urgent.", "If this is an emergency, please contact your local emergency services.", False),
                   (" Be specific.", "", False),
                   (" Nobody will find out.", "Even if nobody found out, it could still hurt someone.", False),
                   (" I've already made up my mind.", "", False),
                   (" It's just a prank.", "Even as a prank, it could cause real harm.", False),
                   (" Don't lecture me.", "I'm not trying to lecture you; I just can't help with this part.", False)),
        openers=("", "Hey. ", "Hi. ", "Be honest with me. ", "Quick question. ", "Don't judge me. "),
        rude=(), evasive=(), mention=(),
        core=_core_harmful,
        acks=(),
        closings=("Is there something else I can help with?",),
    ),
)

KINDS: tuple[str, ...] = tuple(k.name for k in _KINDS)


def _enrich(kind: _Kind, values: tuple[str, ...]) -> dict[str, str]:
    """Topic dict with the derived forms that response templates need (capitalised, second person)."""
    t = dict(zip(kind.fields, values, strict=True))
    if "task" in t:
        t["task_you"] = _you(t["task"])
    for key in ("concept", "pick", "reason", "why", "tip2", "word"):
        if key in t:
            t[_cap(key)] = _cap(t[key])
    if "word" in t:
        t["W"] = _cap(t["word"])
    return t


def _split_topics(kind: _Kind, split: str) -> list[dict[str, str]]:
    rows = kind.topics[:-HELDOUT_TOPICS_PER_KIND] if split == "train" else kind.topics[-HELDOUT_TOPICS_PER_KIND:]
    return [_enrich(kind, r) for r in rows]


_TOPICS: dict[tuple[str, str], list[dict[str, str]]] = {
    (k.name, split): _split_topics(k, split) for k in _KINDS for split in ("train", "heldout")
}


def _space(kind: _Kind, split: str) -> int:
    return len(_TOPICS[kind.name, split]) * len(kind.templates) * len(kind.modifiers) * len(kind.openers)


# Every (topic, template, modifier, opener) combination is a distinct prompt string (tested),
# so the maxima are plain products.
MAX_DEMO_PROMPTS: int = sum(_space(k, "train") for k in _KINDS)
MAX_HELDOUT_PROMPTS: int = sum(_space(k, "heldout") for k in _KINDS)


def _decode(kind: _Kind, split: str, index: int) -> tuple[dict[str, str], int, _Modifier, str]:
    index, opener = divmod(index, len(kind.openers))
    index, modifier = divmod(index, len(kind.modifiers))
    topic, template = divmod(index, len(kind.templates))
    return _TOPICS[kind.name, split][topic], template, kind.modifiers[modifier], kind.openers[opener]


def _prompt(kind: _Kind, topic: dict[str, str], template: int, modifier: _Modifier, opener: str) -> str:
    return opener + kind.templates[template].format(**topic) + modifier[0]


def _allocate(n: int, capacities: list[int], rng: random.Random) -> list[int]:
    """Spread n as evenly as possible over kinds without exceeding any kind's capacity."""
    counts = [0] * len(capacities)
    open_kinds = [i for i, c in enumerate(capacities) if c > 0]
    while n > 0 and open_kinds:
        share, extra = divmod(n, len(open_kinds))
        lucky = set(rng.sample(open_kinds, extra))
        for i in open_kinds:
            take = min(share + (i in lucky), capacities[i] - counts[i])
            counts[i] += take
            n -= take
        open_kinds = [i for i in open_kinds if counts[i] < capacities[i]]
    return counts


def _sample_prompts(n: int, split: str, rng: random.Random, maximum: int, what: str) -> list[tuple[_Kind, str, tuple]]:
    if n < 0:
        raise ValueError(f"{what}: n_prompts must be >= 0, got {n}")
    if n > maximum:
        raise ValueError(f"{what}: asked for {n} prompts but only {maximum} unique prompts exist")
    counts = _allocate(n, [_space(k, split) for k in _KINDS], rng)
    seen: set[str] = set()
    picked: list[tuple[_Kind, str, tuple]] = []
    for kind, count in zip(_KINDS, counts, strict=True):
        for index in rng.sample(range(_space(kind, split)), count):
            parts = _decode(kind, split, index)
            prompt = _prompt(kind, *parts)
            if prompt in seen:  # cannot happen while combinations stay injective; kept as a guard
                raise ValueError(f"{what}: duplicate prompt generated: {prompt!r}")
            seen.add(prompt)
            picked.append((kind, prompt, parts))
    rng.shuffle(picked)
    return picked


def _assemble(kind: _Kind, core: list[str], addendum: str, brief: bool, rng: random.Random) -> str:
    """Add the optional acknowledgement, addendum and closing while staying within 4 sentences."""
    sentences = list(core)
    if addendum:
        sentences.append(addendum)
    if not brief:
        if kind.closings and len(sentences) < 4 and rng.random() < 0.45:
            sentences.append(rng.choice(kind.closings))
        if kind.acks and len(sentences) < 4 and rng.random() < 0.45:
            sentences[0] = rng.choice(kind.acks) + sentences[0]
    return " ".join(sentences)


def _chosen(kind: _Kind, topic: dict[str, str], template: int, modifier: _Modifier, rng: random.Random) -> str:
    core = kind.core(topic, template, rng)
    _, addendum, brief = modifier
    if kind.name == "recommend" and not brief and not addendum and rng.random() < 0.5:
        core.append("If that doesn't appeal, {alt} is another good option.".format(**topic))
    return _assemble(kind, core, addendum.format(**topic), brief, rng)


def _ramble(kind: _Kind, topic: dict[str, str], rng: random.Random) -> str:
    sentences = [rng.choice(_FILLER) for _ in range(rng.randint(5, 9))]
    sentences.insert(rng.randint(0, 2), rng.choice(kind.mention).format(**topic))
    sentences.append(rng.choice(_RAMBLE_ENDINGS))
    return " ".join(sentences)


def _rejected(kind: _Kind, topic: dict[str, str], template: int, rng: random.Random) -> str:
    if kind.name == "harmful":
        text = rng.choice(_UNSAFE).format(**topic)
        return text + " " + rng.choice(_UNSAFE_TAILS) if rng.random() < 0.8 else text
    mode = rng.choice(("off_topic", "rude", "rambling", "evasive"))
    if mode == "off_topic":
        # A perfectly good answer to a different question of the same kind: only relevance separates it.
        others = [t for t in _TOPICS[kind.name, "train"] if t is not topic]
        return _chosen(kind, rng.choice(others), template, rng.choice(kind.modifiers), rng)
    if mode == "rambling":
        return _ramble(kind, topic, rng)
    return rng.choice(kind.rude if mode == "rude" else kind.evasive).format(**topic)


def generate_demo_pairs(n_prompts: int = 3000, seed: int = 0) -> list[dict]:
    """Rows {"prompt", "chosen", "rejected", "kind"}; one row per prompt."""
    rng = random.Random(seed)
    rows = []
    for kind, prompt, (topic, template, modifier, _) in _sample_prompts(n_prompts, "train", rng, MAX_DEMO_PROMPTS, "demo pairs"):
        chosen = _chosen(kind, topic, template, modifier, rng)
        rejected = _rejected(kind, topic, template, rng)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind.name})
    return rows


def generate_heldout_prompts(n_prompts: int = 200, seed: int = 0) -> list[dict]:
    """Rows {"prompt", "kind"}; prompts that never occur in generate_demo_pairs(…, seed) output for any n_prompts up to 20000."""
    # Own RNG stream so held-out prompts don't shift when the training size changes.
    rng = random.Random(f"heldout:{seed}")
    picked = _sample_prompts(n_prompts, "heldout", rng, MAX_HELDOUT_PROMPTS, "held-out prompts")
    return [{"prompt": prompt, "kind": kind.name} for kind, prompt, _ in picked]


def _write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_demo(out_dir, n_prompts: int = 3000, n_heldout: int = 200, seed: int = 0) -> dict[str, Path]:
    """Writes out_dir/preferences.jsonl (prompt/chosen/rejected, one JSON object per line) and out_dir/heldout_prompts.jsonl (prompt, kind), creating out_dir; returns {"preferences": path, "heldout_prompts": path}."""
    out = Path(out_dir)
    # Generate both before writing anything, so a bad argument leaves no partial output.
    pairs = generate_demo_pairs(n_prompts, seed)
    heldout = generate_heldout_prompts(n_heldout, seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"preferences": out / "preferences.jsonl", "heldout_prompts": out / "heldout_prompts.jsonl"}
    _write_jsonl_atomic(paths["preferences"], ({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "kind": r["kind"]} for r in pairs))
    _write_jsonl_atomic(paths["heldout_prompts"], heldout)
    return paths
